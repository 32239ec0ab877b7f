"""A method's settings: one dataclass holds every hyper-parameter with its default, its help and
its static constraints, in field metadata. Nothing here knows about config files; adapters (the
Dassl trainers) map field `n_ctx` to their own key, e.g. TRAINER.HICROPL.N_CTX, and back.

    @dataclass(frozen=True)
    class CoOpSettings:
        n_ctx: int = option(16, "context tokens", low=1, high=MAX_CONTEXT_TOKENS)
        csc: bool = option(False, "class-specific context")
        class_token_position: str = option("end", "where the class name goes", choices=("end", "middle", "front"))
"""
import difflib
import math
import typing
from dataclasses import field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type, TypeVar

from ..clip.loading import BackboneShape  # noqa: F401  (what `validate(shape)` receives)
from ..errors import UserError

Settings = TypeVar("Settings")


class ConfigError(UserError, ValueError):
    """An invalid setting: which one (the field name), its value and what is allowed. Adapters
    name it by their own key through `key_message`."""

    def __init__(self, setting: str, value: Any, allowed: str):
        self.setting, self.value, self.allowed = setting, value, allowed
        super().__init__(f"{setting.upper()}={value!r} is invalid: {allowed}")

    def key_message(self, key_of) -> str:
        """The message with the adapter's key for the setting, e.g. TRAINER.HICROPL.N_CTX=99 ..."""
        return f"{key_of(self.setting)}={self.value!r} is invalid: {self.allowed}"


def option(default: Any, help: str, *, choices: Optional[Sequence[Any]] = None,
           low: Optional[float] = None, high: Optional[float] = None):
    """A settings field: its default, its help text, and the values it may take (checked by
    `check_static`; bounds inclusive). Limits that depend on the backbone belong to the
    settings' own `validate(shape: BackboneShape)` method, which adapters call before loading
    any weights when the backbone is a named one."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None,
                                            "low": low, "high": high})


def help_of(settings_type: Type, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(settings_type) if f.name == name)


def field_types(settings_type: Type) -> Dict[str, type]:
    return typing.get_type_hints(settings_type)


def _type_ok(value: Any, expected: type) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def check_static(settings) -> None:
    """Types, choices and bounds declared on the fields (bool is no int, an int is a float)."""
    types = field_types(type(settings))
    for f in fields(settings):
        value, expected, meta = getattr(settings, f.name), types[f.name], f.metadata
        if not _type_ok(value, expected):
            raise ConfigError(f.name, value, f"expected {expected.__name__}, got {type(value).__name__}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f.name, value, f"must be one of {meta['choices']}")
        low, high = meta.get("low"), meta.get("high")
        if expected in (int, float):
            if expected is float and not math.isfinite(value):
                raise ConfigError(f.name, value, "must be a finite number")
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"
                raise ConfigError(f.name, value, f"must be in {bounds}")


def checked(settings: Settings, shape: BackboneShape) -> Settings:
    """`check_static`, then the settings' own `validate(shape)` if they have one (limits that
    depend on the backbone). Models call it, so every way of building one is checked."""
    check_static(settings)
    if hasattr(settings, "validate"):
        settings.validate(shape)
    return settings


def from_values(settings_type: Type[Settings], values: Mapping[str, Any],
                overrides: Optional[Mapping[str, Any]] = None) -> Settings:
    """Settings from a mapping keyed by upper-case field names (a config node); keys that are
    not fields are ignored (an adapter may keep its own keys, such as PREC, in the same node).
    Checked with `check_static`."""
    chosen = {f.name: values[f.name.upper()] for f in fields(settings_type) if f.name.upper() in values}
    settings = settings_type(**{**chosen, **(overrides or {})})
    check_static(settings)
    return settings


def checked_values(settings_type: Type[Settings], values: Mapping[str, Any]) -> Settings:
    """Settings from {field: value} (the others at their defaults), checked with `check_static`."""
    settings = settings_type(**values)
    check_static(settings)
    return settings


def defaults(settings_type: Type, overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """{FIELD: default} in declaration order, with `overrides` ({field: value}) applied."""
    overrides = overrides or {}
    return {f.name.upper(): overrides.get(f.name, f.default) for f in fields(settings_type)}


def describe(settings_type: Type, key_of=str.upper, overrides: Optional[Mapping[str, Any]] = None) -> List[str]:
    """One line per setting: key, default (with `overrides` applied), help, allowed values."""
    values = defaults(settings_type, overrides)
    lines = []
    for f in fields(settings_type):
        meta = f.metadata
        allowed = f" (one of {', '.join(map(str, meta['choices']))})" if meta.get("choices") else ""
        lines.append(f"{key_of(f.name)} = {values[f.name.upper()]!r}: {meta.get('help', '')}{allowed}")
    return lines


def closest(name: str, candidates: Sequence[str]) -> List[str]:
    """The candidates spelled most like `name` (for 'did you mean' messages)."""
    return difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
