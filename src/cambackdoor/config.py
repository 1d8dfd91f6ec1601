"""Presets (YAML files in ``configs/``) merged with command-line overrides, and config hashing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cambackdoor.errors import CamBackdoorError

CONFIG_DIR = Path(__file__).parent / "configs"
T = TypeVar("T")


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """A preset's sections (``train``, ``implant``, ``evaluate``) as plain dicts."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        raise CamBackdoorError(f"unknown preset '{name}'; available: {', '.join(preset_names())} (or a path to a .yaml file)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CamBackdoorError(f"preset {path} is not valid YAML ({exc.__class__.__name__})") from None
    return data


def make_config(cls: type[T], values: dict[str, Any], overrides: dict[str, Any] | None = None) -> T:
    """Build dataclass ``cls`` from preset values plus non-None overrides; unknown keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    merged = dict(values)
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(merged) - set(fields))
    if unknown:
        raise CamBackdoorError(f"unknown {cls.__name__} setting(s) {unknown}; known: {', '.join(sorted(fields))}")
    try:
        return cls(**merged)
    except (TypeError, ValueError) as exc:
        raise CamBackdoorError(f"invalid {cls.__name__}: {exc}") from None


def config_hash(*configs: Any) -> str:
    """Stable short hash of one or more dataclass configs or dicts."""
    blobs = [dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c for c in configs]
    text = json.dumps(blobs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
