"""Presets (YAML files in ``configs/``) merged with command-line overrides, field checks, config hashing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cambackdoor.errors import CamBackdoorError

CONFIG_DIR = Path(__file__).parent / "configs"
PRESET_SECTIONS = ("train", "implant", "evaluate", "audit")
T = TypeVar("T")


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """A preset's sections (``train``, ``implant``, ``evaluate``) as plain dicts."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        raise CamBackdoorError(f"unknown preset '{name}'; available: {', '.join(preset_names())} (or a path to a .yaml file)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CamBackdoorError(f"preset {path} is not valid YAML ({exc.__class__.__name__})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise CamBackdoorError(f"preset {path} must be a mapping with sections {', '.join(PRESET_SECTIONS)}, "
                               f"not a {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in PRESET_SECTIONS)
    if unknown:
        raise CamBackdoorError(f"preset {path} has unknown section(s) {unknown}; use {', '.join(PRESET_SECTIONS)}")
    for key, section in data.items():
        if section is None:
            data[key] = {}
        elif not isinstance(section, dict):
            raise CamBackdoorError(f"section '{key}' of preset {path} must be a mapping of settings, "
                                   f"not a {type(section).__name__}")
    return data


def parse_value(text: str, what: str) -> Any:
    """A command-line value read as YAML (numbers, booleans, strings); a one-line error when it is not."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise CamBackdoorError(f"cannot read the value '{text}' of {what}; write a number, true/false or a name") from None


def make_config(cls: type[T], values: dict[str, Any], overrides: dict[str, Any] | None = None) -> T:
    """Build dataclass ``cls`` from preset values plus non-None overrides; unknown keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    merged = dict(values)
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(str(k) for k in set(merged) - set(fields))
    if unknown:
        raise CamBackdoorError(f"unknown {cls.__name__} setting(s) {unknown}; known: {', '.join(sorted(fields))}")
    try:
        return cls(**merged)
    except (TypeError, ValueError) as exc:
        raise CamBackdoorError(f"invalid {cls.__name__}: {exc}") from None


def check_fields(obj: Any) -> None:
    """Type-check every field of a config dataclass against its annotation (bool, int, float, str).

    Ints are accepted for floats and converted; floats must be finite. Raises ValueError naming the
    field, so a YAML or ``--set`` typo (``freeze_bn=maybe``, ``lr=nan``) stops before any work.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        kind, value = hints[f.name], getattr(obj, f.name)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"{f.name} must be a finite number, not {value}")
                object.__setattr__(obj, f.name, value)
        elif kind is str:
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            raise ValueError(f"{f.name} must be {kind.__name__}, not {value!r}")


def check_range(obj: Any, name: str, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ValueError unless ``low <= obj.name <= high`` (open ends when asked)."""
    value = getattr(obj, name)
    bad = (low is not None and (value < low or (low_open and value == low))) or \
          (high is not None and (value > high or (high_open and value == high)))
    if bad:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "" if high is None else f"{high}{')' if high_open else ']'}"
        where = f"in {lo}, {hi}" if low is not None and high is not None else (f">= {low}" if not low_open else f"> {low}") \
            if high is None else f"<= {high}"
        raise ValueError(f"{name} must be {where}, not {value}")


def check_choice(obj: Any, name: str, choices: typing.Iterable[str]) -> None:
    choices = tuple(choices)
    if getattr(obj, name) not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {getattr(obj, name)!r}")


def config_hash(*configs: Any) -> str:
    """Stable short hash of one or more dataclass configs or dicts."""
    blobs = [dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c for c in configs]
    text = json.dumps(blobs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_sets(items: list[str], raw: tuple[str, ...] = ()) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as a dict; values are YAML scalars, except the keys in ``raw`` (kept as text)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise CamBackdoorError(f"--set takes KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        key = key.strip()
        if key == "recipe":
            raise CamBackdoorError("the recipe is chosen with --recipe, not --set recipe=...")
        out[key] = value if key in raw else parse_value(value, f"--set {key}")
    return out
