"""YAML configs with ``--set key.sub=value`` command-line overrides."""

from __future__ import annotations

import argparse
import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml


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
        raise ValueError(f"override {item!r} is not of the form KEY=VALUE (e.g. train.max_steps=100)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {item!r} has an empty key")
    value = yaml_load(raw) if raw.strip() else ""
    # YAML reads "1e-4" as a string; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(
    config: dict[str, Any], overrides: list[str] | None, strict: bool = True
) -> dict[str, Any]:
    """Return a copy of ``config`` with overrides applied; unknown keys are an error when ``strict``."""
    config = copy.deepcopy(config)
    for item in overrides or []:
        keys, value = parse_override(item)
        node = config
        for depth, k in enumerate(keys[:-1]):
            if k not in node or not isinstance(node[k], dict):
                if strict:
                    where = ".".join(keys[:depth]) or "<top level>"
                    raise KeyError(
                        f"override {item!r}: no section {k!r} in {where}; valid keys: {sorted(node)}"
                    )
                node[k] = {}
            node = node[k]
        if strict and keys[-1] not in node:
            raise KeyError(f"override {item!r}: unknown key {keys[-1]!r}; valid keys here: {sorted(node)}")
        node[keys[-1]] = value
    return config


def load_config(
    path: str | os.PathLike, overrides: list[str] | None = None, strict: bool = True
) -> dict[str, Any]:
    """Load a YAML file (mapping at top level) and apply ``key=value`` overrides.

    A config may name ``base: other.yaml`` (relative to itself); it is loaded first and this file's keys
    are merged over it, so ablation configs only list what they change.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        config = yaml_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"config {path} must be a YAML mapping, got {type(config).__name__}")
    base = config.pop("base", None)
    if base:
        config = merge(load_config(path.parent / base, strict=strict), config)
    return apply_overrides(config, overrides, strict=strict)


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
        default=[],
        metavar="KEY=VALUE",
        help="Override config entries, dotted keys allowed, values parsed as YAML "
        "(e.g. --set train.max_steps=100 loss.align_coeff=0.0).",
    )


def save_config(config: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the resolved config next to a run's outputs (atomically)."""
    from utils.checkpoint import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
