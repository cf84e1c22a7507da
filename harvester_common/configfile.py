"""Config files, as both sides read them: one TOML file validated once into pydantic models.

Unknown keys are errors (each side's models forbid extras), so a typo never silently falls back to a default; a file
that cannot be used raises ConfigError with one line naming the file, the key and the reason; relative paths are
resolved against the config file's folder.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A configuration file that cannot be used. The message names the file, the key and the reason."""


def _resolve_paths(obj: Any, base: Path) -> Any:
    """Make every Path in a validated config absolute, relative to the config file's folder."""
    if isinstance(obj, Path):
        return obj if obj.is_absolute() else (base / obj).resolve()
    if isinstance(obj, list):
        return [_resolve_paths(v, base) for v in obj]
    if isinstance(obj, BaseModel):
        updates = {name: _resolve_paths(getattr(obj, name), base) for name in type(obj).model_fields}
        return obj.model_copy(update=updates)
    return obj


def format_validation_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    extra = f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    got = first.get("input")
    got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict | list) else ""
    return f"{path}: {key}: {first['msg']}{got_s}{extra}"


def parse_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_model(path: str | Path, model: type[M]) -> M:
    """Read a TOML file into `model`; ConfigError with a one-line reason; relative paths resolved."""
    p = Path(path)
    raw = parse_toml(p)
    try:
        cfg = model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(p, e)) from None
    resolved: M = _resolve_paths(cfg, p.resolve().parent)
    return resolved
