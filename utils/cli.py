"""Entry-point wrapper: a user mistake ends with one message and exit code 2, a bug keeps its traceback.

    from utils.cli import UserError, run_cli

    def main(argv=None):
        problems = [f"--image_dir {d} does not exist" for d in dirs if not Path(d).is_dir()]
        raise_if_problems(problems, "cannot start")   # every missing input at once
        ...

    if __name__ == "__main__":
        run_cli(main)

What counts as a user error (message on stderr, exit code 2 like argparse's own usage errors, no traceback):

- ``UserError``: raised by entry points for bad inputs they checked themselves (missing folders, bad values);
- ``MissingWeightsError`` (utils/weights.py): pretrained weights are not on this machine; its message already
  names the file and the command that fetches it;
- ``FileNotFoundError``: an entry point's only file inputs are the paths given on its command line or in its
  config, so a missing file is almost always a wrong path. The message names the file. (A bug that opens a
  wrong internal path would also land here; set ``TRACEBACK=1`` to see where it came from.)

Everything else (``ValueError`` from a library, ``RuntimeError``, ...) is treated as a bug and keeps its full
traceback. ``TRACEBACK=1`` in the environment shows the traceback for user errors too. Ctrl-C exits with 130
and one line.
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from utils.weights import MissingWeightsError

USER_ERROR_EXIT_CODE = 2  # argparse uses 2 for usage errors; a wrong path is the same kind of mistake


class UserError(Exception):
    """A problem with the user's inputs (paths, flag values, data sizes) that the user can fix."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, MissingWeightsError, FileNotFoundError)


def raise_if_problems(problems: Sequence[str | BaseException], what: str = "cannot start") -> None:
    """Raise once for every problem found (nothing happens for an empty list).

    A problem is a message or the user-error exception that was caught while checking. One caught exception
    alone is re-raised as it is (callers and tests that expect e.g. ``MissingWeightsError`` still get it);
    otherwise one ``UserError`` lists every problem.
    """
    problems = [p for p in problems if p]
    if not problems:
        return
    if len(problems) == 1 and isinstance(problems[0], USER_ERRORS):
        raise problems[0]
    if len(problems) == 1:
        raise UserError(f"{what}: {problems[0]}")
    raise UserError(f"{what}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def format_user_error(err: BaseException, prog: str) -> str:
    """``<prog>: error: <message>``; a long single line is wrapped, a listed message keeps its lines."""
    message = str(err) or type(err).__name__
    if isinstance(err, FileNotFoundError) and not isinstance(err, MissingWeightsError) and err.filename:
        message = f"file not found: {err.filename}" + (f" ({err.strerror})" if err.strerror else "")
    lines = message.splitlines() or [""]
    first = textwrap.fill(f"{prog}: error: {lines[0]}", width=110, subsequent_indent="  ")
    return "\n".join([first, *lines[1:]])


def run_cli(main: Callable[..., Any], argv: Sequence[str] | None = None) -> Any:
    """Run ``main(argv)`` (or ``main()`` when ``argv`` is None); user errors exit 2 with a message."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "error"
    try:
        return main() if argv is None else main(list(argv))
    except USER_ERRORS as err:
        if os.environ.get("TRACEBACK"):
            raise
        print(format_user_error(err, prog), file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
