"""Checkpoints: safetensors weights + a JSON sidecar; no pickle is ever loaded.

``model.safetensors`` holds the weights, ``model.json`` beside it the architecture, config, metrics,
data fingerprint, package version, git commit and the weights' sha256 (so a corrupt or swapped file
is caught). Training state for ``--resume`` (optimizer, scheduler, RNG) is split the same way:
tensors to safetensors, everything else to JSON. Every write goes to a temp file, then is renamed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cambackdoor.errors import CamBackdoorError

FORMAT = "cambackdoor-checkpoint/1"


def weights_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.suffix == ".safetensors" else p.with_suffix(".safetensors")


def sidecar_path(path: str | os.PathLike) -> Path:
    return weights_path(path).with_suffix(".json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CamBackdoorError(f"cannot write {path} ({exc.strerror}); choose a writable output directory") from None


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CamBackdoorError(f"cannot write {path} ({exc.strerror}); choose a writable output directory") from None


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    d = Path(path)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CamBackdoorError(f"output directory {d} is not writable ({exc.strerror}); pass --out to a writable place") from None
    return d


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def save_model(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write ``path``.safetensors and its ``.json`` sidecar atomically; returns the weights path."""
    from cambackdoor import __version__

    wpath = weights_path(path)
    wpath.parent.mkdir(parents=True, exist_ok=True)
    arch = getattr(model, "arch", None)
    if arch is None:
        raise CamBackdoorError("this model was not made by build_model, so its architecture cannot be recorded")
    atomic_save_tensors(model.state_dict(), wpath)
    sidecar = {
        "format": FORMAT,
        "model": arch,
        "package_version": __version__,
        "git_commit": git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "weights_sha256": sha256_file(wpath),
        **_jsonable(meta or {}),
    }
    atomic_write_text(sidecar_path(wpath), json.dumps(sidecar, indent=2, sort_keys=True))
    return wpath


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    wpath, spath = weights_path(path), sidecar_path(path)
    if not wpath.exists():
        raise CamBackdoorError(f"checkpoint {wpath} not found; pass the .safetensors file written by 'cambackdoor train'")
    if not spath.exists():
        raise CamBackdoorError(f"checkpoint {wpath} has no sidecar {spath.name}; copy the .json written beside it")
    try:
        meta = json.loads(spath.read_text())
    except json.JSONDecodeError:
        raise CamBackdoorError(f"sidecar {spath} is not valid JSON; the checkpoint is corrupt, retrain or restore it") from None
    if meta.get("format") != FORMAT or "model" not in meta:
        raise CamBackdoorError(f"{spath} is not a cambackdoor checkpoint sidecar (format {meta.get('format')!r})")
    return meta


def load_model(
    path: str | os.PathLike, expect: dict[str, Any] | None = None, map_location: str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint; returns (model, metadata). ``expect`` (e.g. {"width": 16}) must match."""
    from cambackdoor.models import build_model

    meta = read_sidecar(path)
    arch = meta["model"]
    for key, value in (expect or {}).items():
        if arch.get(key) != value:
            raise CamBackdoorError(
                f"checkpoint {weights_path(path)} is a {arch.get('name')} of {key}={arch.get(key)}, "
                f"not {key}={value}; pass a matching checkpoint or set {key}={arch.get(key)}"
            )
    wpath = weights_path(path)
    if meta.get("weights_sha256") and sha256_file(wpath) != meta["weights_sha256"]:
        raise CamBackdoorError(f"checkpoint {wpath} does not match its sidecar's sha256: corrupt or replaced file")
    try:
        state = load_file(str(wpath), device=map_location)
    except Exception as exc:
        raise CamBackdoorError(f"checkpoint {wpath} cannot be read ({type(exc).__name__}); the file is corrupt") from None
    model = build_model(arch["name"], arch["num_classes"], arch["width"])
    load_state_checked(model, state, str(wpath))
    return model, meta


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = (
            f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, model expects {tuple(own[wrong[0]].shape)}"
            if wrong
            else f"missing {missing[:2]} unexpected {unexpected[:2]}"
        )
        raise CamBackdoorError(
            f"{where} holds weights of another architecture ({detail}); build the model with the checkpoint's name and width"
        )
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# Training state (optimizer, scheduler, RNG) without pickle


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a training state")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _join(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        if "__list__" in obj:
            return [_join(v, tensors) for v in obj["__list__"]]
    return obj


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Store a nested dict of tensors and plain values as safetensors + JSON (atomic)."""
    wpath = weights_path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "s", tensors)
    atomic_save_tensors(tensors, wpath)
    atomic_write_text(sidecar_path(wpath), json.dumps({"format": "cambackdoor-state/1", "state": skeleton}))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    wpath, spath = weights_path(path), sidecar_path(path)
    try:
        skeleton = json.loads(spath.read_text())["state"]
        tensors = load_file(str(wpath))
    except Exception as exc:
        raise CamBackdoorError(f"training state {wpath} is unreadable ({type(exc).__name__}); delete it to start over") from None
    return _join(skeleton, tensors)


def capture_state(model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                  **extra: Any) -> dict[str, Any]:
    """What ``--resume`` needs: weights, optimizer, both random-number states, plus ``extra``."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(), **extra}


def restore_state(path: str | os.PathLike, config_hash: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                  generator: torch.Generator, what: str, config_name: str = "config",
                  allow_other_config: bool = False) -> dict[str, Any]:
    """Load a state written by :func:`capture_state` into the model, optimizer and random-number
    generators, after checking that the same config wrote it; returns the whole state (for ``extra``)."""
    state = load_state(path)
    if state["config_hash"] != config_hash and not allow_other_config:
        raise CamBackdoorError(
            f"{what} was started with another {config_name} or dataset (hash {state['config_hash']} vs "
            f"{config_hash}); use a new --out or drop --resume"
        )
    load_state_checked(model, state["model"], str(weights_path(path)))
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state
