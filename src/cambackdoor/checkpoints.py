"""Checkpoints: safetensors weights + a JSON sidecar; no pickle is ever loaded.

``model.safetensors`` holds the weights, ``model.json`` beside it the architecture, config, metrics,
data fingerprint, package version, git commit and the weights' sha256 (required, so a corrupt or
swapped file is caught). Training state for ``--resume`` (weights, optimizer, RNG, the metrics so
far) is ONE safetensors file whose metadata holds everything that is not a tensor: it is the run's
commit point, written first after each epoch; ``model.*`` and ``metrics.jsonl`` are derived from it
and rewritten on resume, so a kill between any two writes loses nothing. Every write goes to a temp
file, then is renamed.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cambackdoor.errors import CamBackdoorError
from cambackdoor.models import build_model
from cambackdoor.version import __version__

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


def weights_digest(model: nn.Module) -> str:
    """sha256 of the weights, so a saved state is only resumed onto the model it started from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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
    except Exception as exc:  # OSError, and safetensors' own SafetensorError on a full disk
        tmp.unlink(missing_ok=True)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        raise CamBackdoorError(f"cannot write {path} ({why}); free disk space or choose a writable output directory") from None


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


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Write a result folder as a whole: fill the yielded temporary folder, and on success it replaces
    ``out`` (an old ``out`` is moved aside first and then removed); on failure nothing changes."""
    out = Path(out)
    ensure_writable_dir(out.parent)
    if out.exists() and not out.is_dir():
        raise CamBackdoorError(f"{out} exists and is not a folder; pass another --out")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def save_model(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write ``path``.safetensors and its ``.json`` sidecar atomically; returns the weights path."""
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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CamBackdoorError(f"{spath} is not a cambackdoor checkpoint sidecar (format {got!r}); pass the .json "
                               "written beside the weights by cambackdoor")
    arch = meta.get("model")
    ok = isinstance(arch, dict) and isinstance(arch.get("name"), str) and all(
        isinstance(arch.get(k), int) and not isinstance(arch.get(k), bool) and arch.get(k) > 0
        for k in ("num_classes", "width"))
    if not ok:
        raise CamBackdoorError(f"{spath} has no valid 'model' entry (name, positive integer num_classes and width); "
                               "restore the sidecar written with the weights")
    sha = meta.get("weights_sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise CamBackdoorError(f"{spath} has no weights_sha256, so the weights cannot be checked; restore the sidecar "
                               "written with the weights")
    return meta


def load_model(
    path: str | os.PathLike, expect: dict[str, Any] | None = None, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint; returns (model on ``map_location``, metadata). ``expect`` (e.g. {"width": 16}) must match."""
    meta = read_sidecar(path)
    arch = meta["model"]
    for key, value in (expect or {}).items():
        if arch.get(key) != value:
            raise CamBackdoorError(
                f"checkpoint {weights_path(path)} is a {arch.get('name')} of {key}={arch.get(key)}, "
                f"not {key}={value}; pass a matching checkpoint or set {key}={arch.get(key)}"
            )
    wpath = weights_path(path)
    if sha256_file(wpath) != meta["weights_sha256"]:
        raise CamBackdoorError(f"checkpoint {wpath} does not match its sidecar's sha256: corrupt or replaced file")
    try:
        state = load_file(str(wpath))
    except Exception as exc:
        raise CamBackdoorError(f"checkpoint {wpath} cannot be read ({type(exc).__name__}); the file is corrupt") from None
    model = build_model(arch["name"], arch["num_classes"], arch["width"])
    load_state_checked(model, state, str(wpath))
    return model.to(map_location), meta


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


STATE_FORMAT = "cambackdoor-state/2"


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Store a nested dict of tensors and plain values as ONE safetensors file (atomic): the tensors
    as tensors, the rest as JSON in its metadata, so no kill can leave half a state behind."""
    wpath = weights_path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "s", tensors)
    atomic_save_tensors(tensors, wpath, metadata={"format": STATE_FORMAT, "state": json.dumps(skeleton)})


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    wpath, spath = weights_path(path), sidecar_path(path)
    try:
        with safe_open(str(wpath), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") == STATE_FORMAT:
            skeleton = json.loads(meta["state"])
        else:  # cambackdoor-state/1 (before 2026-11-25): the JSON half in a sidecar
            skeleton = json.loads(spath.read_text())["state"]
        tensors = load_file(str(wpath))
        return _join(skeleton, tensors)
    except Exception as exc:
        raise CamBackdoorError(f"training state {wpath} is unreadable ({type(exc).__name__}); start over with "
                               "--overwrite") from None


def state_config_hash(path: str | os.PathLike) -> str | None:
    """The config hash a saved state was written under (None when there is no readable state)."""
    if not weights_path(path).exists():
        return None
    try:
        return str(load_state(path)["config_hash"])
    except (CamBackdoorError, KeyError, TypeError):
        return None


def claim_run_dir(run: Path, markers: tuple[str, ...], resume: bool, overwrite: bool) -> None:
    """Refuse to write a new run over a folder that already holds one, unless asked to.

    ``markers`` are the files that mark a run there; ``resume`` continues it, ``overwrite`` starts
    over (its old files are replaced as the new run writes them). Creates ``run`` if need be, and
    checks that it is writable."""
    ensure_writable_dir(run)
    found = [m for m in markers if (run / m).exists()]
    if found and not resume and not overwrite:
        raise CamBackdoorError(f"{run} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                               "--overwrite to start over, or a new --out")


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
    if state.get("config_hash") != config_hash and not allow_other_config:
        raise CamBackdoorError(
            f"{what} was started with another {config_name} or dataset (hash {state.get('config_hash')} vs "
            f"{config_hash}); use a new --out, or --overwrite to start over"
        )
    load_state_checked(model, state["model"], str(weights_path(path)))
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return state
