"""The types and spelling of the extension's keys, checked on the raw config before anything coerces a value.

Every key's value is checked against its dataclass annotation (:data:`.arguments.EXTENSION_DATACLASSES`): YAML
booleans for booleans, integers for integers, one of the choices for a ``Literal``; a misspelt key is refused
naming the closest one.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, fields
from functools import cache
from typing import Any, Literal

from .arguments import EXTENSION_DATACLASSES
from .config_values import describe, parse_scalar


@cache
def extension_fields() -> dict[str, tuple[Any, Any]]:
    """Every extension key with its resolved type annotation and its default."""
    out = {}
    for cls in EXTENSION_DATACLASSES:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            out[f.name] = (hints[f.name], f.default if f.default is not MISSING else None)
    return out


def _split_optional(annotation: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); `X` -> (X, False); unions of several types -> (None, ...) (not checked)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else None), len(rest) < len(args)
    return annotation, False


def _type_problem(key: str, value: Any, annotation: Any, default: Any) -> str | None:
    """What `key` takes and how to write it, if `value` does not fit `annotation`; None if it fits."""
    kind, optional = _split_optional(annotation)
    if value is None:
        return None if optional else f"cannot be null: write a value, e.g. `{key}: {yaml_text(default)}`"
    null = " (or null for the default)" if optional else ""
    quoted = " (remove the quotes)" if isinstance(value, str) and not isinstance(parse_scalar(value), str) else ""
    if kind is bool:
        if isinstance(value, bool):
            return None
        return f"takes a boolean{null}: write `{key}: true` or `{key}: false`, unquoted{quoted}"
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        example = default if isinstance(default, int) and not isinstance(default, bool) else 1
        return f"takes an integer{null}: write it unquoted, e.g. `{key}: {example}`{quoted}"
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        example = yaml_text(default) if isinstance(default, float) else "1.0e-5"
        return f"takes a number{null}: write it unquoted, e.g. `{key}: {example}`{quoted}"
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value in choices and type(value) is type(choices[0]):
            return None
        return f"takes one of {', '.join(yaml_text(c) for c in choices)}{null}"
    if kind is str:
        if isinstance(value, str):
            return None
        return f"takes text{null}, e.g. `{key}: {yaml_text(default)}` (several names: one comma-separated string)"
    return None  # other annotations: left to LLaMA-Factory's parser


def yaml_text(value: Any) -> str:
    """A value as YAML writes it: ``null``, ``true``/``false``, else its text."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_extension_types(values: Mapping[str, Any], command_line: bool = False) -> dict[str, Any]:
    """Refuse an extension key whose value has the wrong type, before anything coerces it; return the values.

    Booleans must be YAML booleans (not `"no"`, `"false"`, 1), integers integers (not booleans or text),
    numbers integers or floats (not text), choices one of the choices; keys typed `X | None` accept null.
    With ``command_line=True`` (a `--key value` list) the text of non-text keys is first read as YAML reads it
    unquoted (:func:`config_values.parse_scalar`), and the returned dict holds those values.

    Raises:
        ValueError: naming the key, the value and how to write it.
    """
    checked = dict(values)
    for key, (annotation, default) in extension_fields().items():
        if key not in checked:
            continue
        value = checked[key]
        if command_line and isinstance(value, str) and _split_optional(annotation)[0] is not str:
            checked[key] = value = parse_scalar(value)
        problem = _type_problem(key, value, annotation, default)
        if problem:
            raise ValueError(f"`{key}: {value!r}` in the training config is {describe(value)}, but `{key}` {problem}.")
    return checked


def fill_null_defaults(args: Any) -> Any:
    """Replace null extension values by their defaults (a key declared `X | None` with a non-null default)."""
    for key, (_, default) in extension_fields().items():
        if hasattr(args, key) and getattr(args, key) is None and default is not None:
            setattr(args, key, default)
    return args


def check_key_spelling(keys: list[str], known: set[str]) -> None:
    """Refuse misspelt extension keys (mfsgd_*, profile_memory_*, learning_rate_*), naming the closest key."""
    prefixes = ("mfsgd_", "use_mfsgd", "profile_memory_", "learning_rate_", "galore_fused")
    ours = sorted(k for k in known if k.startswith(prefixes))
    for key in keys:
        if key.startswith(prefixes) and key not in known:
            close = difflib.get_close_matches(key, ours, n=1, cutoff=0.5)
            hint = f" Did you mean `{close[0]}`?" if close else f" Known keys: {', '.join(ours)}."
            raise ValueError(f"Unknown key `{key}` in the training config.{hint}")
