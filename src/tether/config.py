"""Typed run configs: YAML files plus ``key=value`` overrides, validated by pydantic.

Every algorithm has one flat config class deriving from :class:`Config`. An unknown key is an
error that names it, suggests the closest valid key and lists all of them; a value of the wrong
type is an error that names the key and the expected type.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config that cannot be used, with a message meant for the person who wrote it."""


class Config(BaseModel):
    """Base of every run config: flat, typed, documented, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def load(cls: type[C], path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> C:
        """Build a config from an optional YAML file and ``key=value`` overrides (which win). A nested
        option (``arith``) merges key by key, so ``arith.max_operand=30`` or ``arith='{ops: +}'``
        changes one of its settings and keeps the file's others."""
        values: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
        source = str(path) if path else "the command line"
        unknown = [k for k in values if k not in cls.model_fields]
        if unknown:
            raise ConfigError(_unknown_key_message(cls, unknown[0], source))
        given = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
        for key, value in given.items():
            if key not in cls.model_fields:
                raise ConfigError(_unknown_key_message(cls, key, "the command line"))
            nested = isinstance(values.get(key), dict) and isinstance(value, dict) and _is_config(cls, key)
            values[key] = {**values[key], **value} if nested else value
        return cls.from_dict(values, source=f"{path} and the command line" if path and given else source)

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
        unknown = [k for k in values if k not in cls.model_fields]
        if unknown:
            raise ConfigError(_unknown_key_message(cls, unknown[0], source))
        try:
            return cls(**values)
        except ValidationError as e:
            lines = []
            for err in e.errors():
                msg, loc = err["msg"].removeprefix("Value error, "), err["loc"]
                if err["type"] == "extra_forbidden" and len(loc) == 2 and _is_config(cls, str(loc[0])):
                    # a mistyped key of a nested option: named, with the nearest valid one and the list
                    nested = cls.model_fields[str(loc[0])].annotation
                    lines.append(f"  {loc[0]}: {_unknown_key_message(nested, str(loc[1]), source)}")
                elif loc:
                    lines.append(f"  {'.'.join(str(p) for p in loc)}={err.get('input')!r}: {msg}")
                else:  # a check across fields: its message names them; the whole config would only bury it
                    lines.append(f"  {msg}")
            raise ConfigError(f"invalid {cls.__name__} in {source}:\n" + "\n".join(lines)) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def help_text(cls) -> str:
        """One line per option: name, type, default and description (used by ``--help``)."""
        out = []
        for name, f in cls.model_fields.items():
            out.append(f"  {name} ({_type_name(f.annotation)}, default {_shown(f.get_default(call_default_factory=True))})")
            if f.description:
                out.append(f"      {f.description}")
        return "\n".join(out)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=1e-4", "packing=true", "arith.ops=+"]`` -> ``{"lr": 1e-4, "packing": True, "arith":
    {"ops": "+"}}`` (values parsed as YAML; a dotted key sets one setting of a nested option)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"cannot parse override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        head, dot, rest = key.partition(".")
        if dot and rest:
            inner = out.setdefault(head, {})
            if not isinstance(inner, dict):
                raise ConfigError(f"override {item!r}: {head} is set whole and by one of its keys")
            inner[rest] = value
        else:
            out[key] = value
    return out


def _is_config(cls: type[Config], key: str) -> bool:
    """Whether option ``key`` is a nested config (merged key by key), not a plain value or dict."""
    annotation = cls.model_fields[key].annotation
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


# Names TRL / transformers users type, mapped to tether's, for the "did you mean" hint.
KNOWN_ALIASES = {
    "learning_rate": "lr", "per_device_train_batch_size": "micro_batch_size", "max_seq_length": "max_length",
    "gradient_accumulation_steps": "batch_size", "lr_scheduler_type": "schedule", "warmup_ratio": "warmup_steps",
    "model_name_or_path": "model", "dataset": "data", "train_file": "data", "bf16": "dtype",
}


def _unknown_key_message(cls: type[BaseModel], key: str, source: str) -> str:
    valid = list(cls.model_fields)
    if key == "config":  # the file as an option, as some trainers' CLIs take it
        return "config is not an option: the YAML file is given as --config FILE (tether COMMAND --config FILE key=value ...)"
    alias = KNOWN_ALIASES.get(key)
    close = [alias] if alias in valid else difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r} in {source} for {cls.__name__}{hint}; valid keys: {', '.join(valid)}"


def _shown(default: Any) -> str:
    """A default as it would be typed on the command line (YAML; nested configs as a flow mapping)."""
    if isinstance(default, BaseModel):
        default = default.model_dump(mode="json")
    if isinstance(default, (dict, list)):
        return yaml.safe_dump(default, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return "none" if default is None else str(default)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (list, dict, tuple, set):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if origin is not None:
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "none")
