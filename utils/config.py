"""YAML configs with ``--set key.sub=value`` command-line overrides, validated against a typed schema.

A trainer passes its schema (a :class:`ConfigSection` subclass: pydantic models, defaults in the schema and
nowhere else) to :func:`load_config`. Every key of every config file (each ``base:`` file on its own) and of
every ``--set`` override must exist in the schema -- an unknown key is an error naming the file and the key
and suggesting the closest valid one -- and the merged result is type-checked (``batch_size: four`` names
``train.batch_size``). The returned dict holds every key, defaults filled in.

pydantic rather than dataclasses: it checks and converts nested types (``list[int]``, ``Literal``, optional
and bounded numbers) and reports every error with its location, which dataclasses would need hand-written
code for; its lax mode also reads ``1e-4`` (a string to YAML 1.1) as a float.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from utils.cli import UserError


class ConfigSection(BaseModel):
    """Base of the config schemas: unknown keys are errors (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid")


class ConfigError(ValueError, UserError):
    """A config file or override that does not fit its schema; the message names the file and the key.

    A :class:`utils.cli.UserError`: entry points under ``run_cli`` end with the message and exit code 2."""


class UnknownConfigKeyError(ConfigError, KeyError):
    """A key that is not in the schema (also a KeyError, as unknown ``--set`` keys always were)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as booleans, so
    ``mixed_precision: no`` (or ``--set train.mixed_precision=no``) would become False instead of "no"."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def yaml_load(text: Any) -> Any:
    """``yaml.safe_load`` with :class:`ConfigLoader` (YAML 1.2 booleans)."""
    return yaml.load(text, Loader=ConfigLoader)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> (["optim", "lr"], 1e-4); the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form KEY=VALUE (e.g. train.max_steps=100)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    value = yaml_load(raw) if raw.strip() else ""
    # YAML reads "1e-4" as a string; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(
    config: dict[str, Any],
    overrides: list[str] | None,
    strict: bool = True,
    schema: type[ConfigSection] | None = None,
) -> dict[str, Any]:
    """Return a copy of ``config`` with overrides applied; unknown keys are an error when ``strict`` (keys of
    ``schema`` when one is given, else keys already in ``config``)."""
    config = copy.deepcopy(config)
    for item in overrides or []:
        keys, value = parse_override(item)
        if schema is not None:
            problem = _unknown_key(schema, keys)
            if problem:
                raise UnknownConfigKeyError(f"override {item!r}: {problem}")
            node = config
            for k in keys[:-1]:
                if not isinstance(node.get(k), dict):
                    node[k] = {}
                node = node[k]
            node[keys[-1]] = value
            continue
        node = config
        for depth, k in enumerate(keys[:-1]):
            if k not in node or not isinstance(node[k], dict):
                if strict:
                    where = ".".join(keys[:depth]) or "<top level>"
                    raise UnknownConfigKeyError(
                        f"override {item!r}: no section {k!r} in {where}; valid keys: {sorted(node)}"
                    )
                node[k] = {}
            node = node[k]
        if strict and keys[-1] not in node:
            raise UnknownConfigKeyError(
                f"override {item!r}: unknown key {keys[-1]!r}; valid keys here: {sorted(node)}"
            )
        node[keys[-1]] = value
    return config


def load_config(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    strict: bool = True,
    schema: type[ConfigSection] | None = None,
) -> dict[str, Any]:
    """Load a YAML file (mapping at top level) and apply ``key=value`` overrides.

    A config may name ``base: other.yaml`` (relative to itself); it is loaded first and this file's keys
    are merged over it, so ablation configs only list what they change. With a ``schema`` every file's keys
    and every override's key are checked against it, then the result is validated (:class:`ConfigError`
    naming the key) and returned with every key of the schema, defaults filled in.
    """
    path = Path(path)
    config = _load_file(path, schema)
    config = apply_overrides(config, overrides, strict=strict, schema=schema)
    if schema is None:
        return config
    source = str(path) + (f" with --set {' '.join(overrides)}" if overrides else "")
    return validate_config(config, schema, source)


def _load_file(path: Path, schema: type[ConfigSection] | None) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        config = yaml_load(f) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"config {path} must be a YAML mapping, got {type(config).__name__}")
    base = config.pop("base", None)
    if schema is not None:
        problems = check_keys(config, schema)
        if problems:
            raise UnknownConfigKeyError(f"config {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    if base:
        config = merge(_load_file(path.parent / base, schema), config)
    return config


def validate_config(
    config: dict[str, Any], schema: type[ConfigSection], source: str = "config"
) -> dict[str, Any]:
    """``config`` checked against ``schema``: the plain dict with defaults filled in, or a :class:`ConfigError`
    listing every bad key with what is wrong and the value given."""
    problems = check_keys(config, schema)
    if problems:
        raise UnknownConfigKeyError(f"{source}:\n" + "\n".join(f"  - {p}" for p in problems))
    try:
        return schema.model_validate(config).model_dump(mode="python")
    except ValidationError as err:
        by_key: dict[str, list[str]] = {}
        for e in err.errors():
            key = _key_of(schema, e["loc"]) or "<top level>"
            got = (
                f" (got {e['input']!r})"
                if e["type"] != "missing" and not isinstance(e["input"], dict)
                else ""
            )
            msg = "required, not set" if e["type"] == "missing" else e["msg"].removeprefix("Value error, ")
            by_key.setdefault(key, []).append(msg + got)
        lines = [f"  - {key}: {' | '.join(dict.fromkeys(msgs))}" for key, msgs in by_key.items()]
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(lines)) from None


# ---------------------------------------------------------------------------------------------- schema walking
def _section_of(annotation: Any) -> type[ConfigSection] | None:
    """The ConfigSection an annotation holds (``Section`` or ``Section | None``), else None."""
    args = typing.get_args(annotation) or (annotation,)
    for a in args:
        if isinstance(a, type) and issubclass(a, ConfigSection):
            return a
    return None


def _is_open_mapping(annotation: Any) -> bool:
    """A free-form ``dict[...]`` field: any keys below it are allowed."""
    args = typing.get_args(annotation) or (annotation,)
    return any(a is dict or typing.get_origin(a) is dict for a in (annotation, *args))


def schema_keys(schema: type[ConfigSection], prefix: str = "") -> list[str]:
    """Every dotted key of ``schema`` (sections and leaves)."""
    out = []
    for name, info in schema.model_fields.items():
        out.append(prefix + name)
        sub = _section_of(info.annotation)
        if sub is not None:
            out += schema_keys(sub, f"{prefix}{name}.")
    return out


def _suggest(schema_root: type[ConfigSection], section: type[ConfigSection], key: str, where: str) -> str:
    close = difflib.get_close_matches(key, list(section.model_fields), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {where + close[0]!r}?"
    # the right name in another section (e.g. train.lr for optim.lr)
    elsewhere = [k for k in schema_keys(schema_root) if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; did you mean {elsewhere[0]!r}?"
    return f"; valid keys here: {sorted(section.model_fields)}"


def _unknown_key(schema: type[ConfigSection], keys: list[str]) -> str | None:
    """Why the dotted key ``keys`` is not in ``schema`` (None if it is)."""
    section = schema
    for depth, k in enumerate(keys):
        where = ".".join(keys[:depth]) + "." if depth else ""
        if k not in section.model_fields:
            return f"unknown key {where + k!r}" + _suggest(schema, section, k, where)
        annotation = section.model_fields[k].annotation
        if _is_open_mapping(annotation):
            return None
        sub = _section_of(annotation)
        if sub is None:
            if depth < len(keys) - 1:
                return f"{where + k!r} is a value, not a section (no key {'.'.join(keys[: depth + 2])!r})"
            return None
        section = sub
    return None


def check_keys(
    config: dict[str, Any],
    schema: type[ConfigSection],
    prefix: str = "",
    root: type[ConfigSection] | None = None,
) -> list[str]:
    """Every key of ``config`` that ``schema`` does not know, each with the closest valid key."""
    root = root or schema
    problems = []
    for k, v in config.items():
        if k not in schema.model_fields:
            problems.append(f"unknown key {prefix + str(k)!r}" + _suggest(root, schema, str(k), prefix))
            continue
        sub = _section_of(schema.model_fields[k].annotation)
        if sub is not None and isinstance(v, dict):
            problems += check_keys(v, sub, f"{prefix}{k}.", root)
    return problems


def _key_of(schema: type[ConfigSection], loc: tuple[Any, ...]) -> str:
    """Dotted key of a pydantic error location (drops the union-member tags pydantic appends)."""
    parts: list[str] = []
    section: type[ConfigSection] | None = schema
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
            continue
        if section is None or item not in section.model_fields:
            break
        parts.append(str(item))
        section = _section_of(section.model_fields[item].annotation)
    return ".".join(parts)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """Add ``--config PATH`` and ``--set KEY=VALUE [KEY=VALUE ...]`` to a parser."""
    parser.add_argument(
        "--config", type=str, default=default, required=default is None, help="YAML config file."
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        action="extend",  # --set a=1 --set b=2 keeps both (a plain store kept only the last)
        default=[],
        metavar="KEY=VALUE",
        help="Override config entries, dotted keys allowed, values parsed as YAML "
        "(e.g. --set train.max_steps=100 loss.align_coeff=0.0). May be repeated; later overrides win.",
    )


def save_config(config: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the resolved config next to a run's outputs (atomically)."""
    from utils.checkpoint import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
