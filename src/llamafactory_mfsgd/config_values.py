"""How the extension reads config values: one YAML loader, one scalar rule, one truthiness rule.

``llamafactory-cli train CFG.yaml key=value`` reads the file and the overrides with OmegaConf, whose YAML rules
are PyYAML's SafeLoader (YAML 1.1 booleans ``true/false/yes/no/on/off``, ``null``/``~``) plus exponent floats
without a dot (``1e-5``). ``python run.py`` and the extension's own checks use the same rules through this
module, so a value means the same thing on every path. Quoted text (``"no"``, ``"0.01"``) stays text and is
refused for boolean and numeric keys by :func:`llamafactory_mfsgd.key_types.check_extension_types`.
Environment switches (`LLAMAFACTORY_MFSGD=0`, ...) follow :func:`llamafactory_mfsgd.activation.env_flag`.
This module imports only the standard library and PyYAML.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

# YAML 1.2-style floats PyYAML's 1.1 resolver misses ("1e-5", "5E+3"); OmegaConf resolves them the same way.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` as a float and refuses duplicated mapping keys (naming key and line)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Build a mapping, raising on a key that appears twice."""
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key `{key}` (line {line}; first set on line {seen[key]}): keep only one of them",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def load_config(path: str) -> dict[str, Any]:
    """Read a training YAML into a dict, with one clear error for a duplicated key, an empty file or a non-mapping.

    Raises:
        ValueError: the file is not a YAML mapping of keys to values, or repeats a key.
    """
    with open(path) as f:
        try:
            config = yaml.load(f, Loader=ConfigLoader)
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from None
    if config is None:
        raise ValueError(f"{path} is empty: a training config is a mapping such as `model_name_or_path: ...`.")
    if not isinstance(config, dict):
        raise ValueError(
            f"{path} holds {describe(config)}, but a training config is a mapping of keys to values "
            "(`key: value` lines, not `- item` lines)."
        )
    return config


def parse_scalar(text: str) -> Any:
    """A command-line value read the way YAML (and llamafactory-cli's OmegaConf) reads it unquoted.

    ``true/false/yes/no/on/off`` become booleans, ``null``/``~``/empty become None, integers and floats
    (``1e-5`` included) become numbers; anything else stays text. Quote a value to keep it text: ``'"no"'``.
    """
    try:
        value = yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError:
        return text
    return value if value is None or isinstance(value, (bool, int, float, str)) else text


def is_set(value: Any) -> bool:
    """The one truthiness rule: Python truthiness of the value as YAML reads it (`"false"`, `"0"`, `"null"`: unset)."""
    return bool(parse_scalar(value) if isinstance(value, str) else value)


def describe(value: Any) -> str:
    """A short phrase for a config value in error messages: `the text 'no'`, `the boolean true`, `a list`."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def raw_values(raw: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Top-level keys and values of a parsed YAML/JSON config, or of a `--key value` / `--key=value` command line."""
    if isinstance(raw, dict):
        return raw
    values: dict[str, Any] = {}
    for i, token in enumerate(raw):
        if token.startswith("--"):
            key, sep, value = token[2:].partition("=")
            has_next = i + 1 < len(raw) and not raw[i + 1].startswith("--")
            values[key] = value if sep else (raw[i + 1] if has_next else True)
    return values
