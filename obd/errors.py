"""The one user-facing error type and the wrapper every command-line entry point runs under.

Anything the user can fix (a bad task name, a corrupt file, a wrong config value) raises
:class:`ObdError` (or a subclass) with a one-line message naming the thing and the problem;
:func:`cli` prints it as ``error: ...`` and exits with status 2. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


class ObdError(Exception):
    """A problem with the user's input; the message is one line and says what to do."""


class ConfigError(ObdError, ValueError):
    """A configuration key, value or file that cannot be used."""


def check_writable(folder: Path, flag: str = "--out") -> None:
    """Fail before any work if ``folder`` cannot be created and written (``flag`` names where it came from)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a probe of its own: workers sharing ``folder`` check it at the same time
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ObdError(f"{flag} {folder}: cannot write there ({e.strerror or e})") from None


def cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; an :class:`ObdError` becomes ``error: MESSAGE`` on stderr and exit status 2,
    Ctrl-C a one-line note and status 130."""
    try:
        return int(main(argv) or 0)
    except ObdError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "error: interrupted; finished stages are cached (files are written atomically), run the command "
            "again to continue",
            file=sys.stderr,
        )
        return 130
