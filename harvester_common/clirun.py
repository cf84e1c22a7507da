"""How our command lines end: a user-fixable error is one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_USAGE = 2


class UserError(Exception):
    """A one-line error for the user (exit status 2) from a command that lives outside its program's cli module,
    which need not list it among its `user_errors`."""


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
