"""How our command lines end: a user-fixable error is one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


class UserError(Exception):
    """A one-line error for the user (exit status 2) from a command that lives outside its program's cli module,
    which need not list it among its `user_errors`."""


def read_limited(path: Path, what: str, limit: int) -> bytes:
    """A file a command was given (a model, a card, a package), read whole but never past `limit` bytes: UserError
    naming it when it is missing, unreadable or larger."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what} file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if len(data) > limit:
        raise UserError(f"{path}: the {what} is larger than it may be ({limit} bytes)")
    return data


def write_atomically(path: Path, data: bytes, what: str = "file") -> None:
    """`path` holds its old content or all of `data`, never a part (write, fsync, rename), readable by others
    (mkstemp's 0600 would keep a package from the service that publishes it). UserError when it cannot be
    written; the temporary file is then gone."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"{path}: cannot write there: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"{path}: cannot write the {what}: {e.strerror or e}") from None
        raise


def run_cli(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, user_errors: tuple[type[BaseException], ...]
) -> int:
    args = parser.parse_args(argv)
    errors: tuple[type[BaseException], ...] = (*user_errors, UserError)
    try:
        return int(args.func(args))
    except errors as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader left, nothing more to say
        sys.stderr.close()
        return 0
