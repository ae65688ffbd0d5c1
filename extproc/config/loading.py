"""Reading a fleet file: YAML to a :class:`~extproc.config.fleet.Fleet`, or a :class:`ConfigError` that names
the file, the key and the problem."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from extproc.config.fleet import Fleet

__all__ = ["ConfigError", "file_stamp", "key_path", "load_fleet", "parse_fleet"]


class ConfigError(Exception):
    """An invalid fleet file. ``str()`` names the file, the key and the problem."""


def parse_fleet(data: Any, source: str = "<memory>") -> Fleet:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the fleet file must be a mapping at the top level")
    try:
        return Fleet.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = key_path(err["loc"])
            problems.append(f"{source}: key {key}: {err['msg']}")
        raise ConfigError("\n".join(problems)) from None


def key_path(loc: Sequence[int | str]) -> str:
    """A pydantic error location as the fleet file's key (``hosts[2].tier``)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"function-after", "function-before"} or "[" in str(part):
            continue  # pydantic's validator frames, not keys of the file
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def load_fleet(path: str | Path) -> Fleet:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the fleet file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_fleet(data, str(path))


def file_stamp(path: Path) -> tuple[float, int] | None:
    """Modification time and size of a fleet file, to notice edits (None while it is missing)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime, st.st_size
