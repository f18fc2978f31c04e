"""fastcbm's one error contract.

Two kinds of failure, and only two:

- :class:`UserError` — the input was wrong: an argument, a file, a model folder, a backend that is not available
  here, pretrained weights that cannot be fetched. The message is one line that names the argument or file and what
  was wrong (and, where there is one, the way out). The CLI prints it as ``fastcbm <command>: error: <message>`` and
  exits 2.
- everything else — an invariant inside fastcbm failed (:class:`InternalError`, or any other exception): a bug. The
  CLI lets it through, so it shows with its traceback (exit 1).

Each concrete user error also derives from the built-in exception a Python caller would expect (``ValueError``,
``FileNotFoundError``, ...), so ``except ValueError`` around an API call keeps working.

Exit codes of the ``fastcbm`` command (:func:`fastcbm.cli.main`): 0 success; 1 a bug (traceback); 2 a user error
(one line; argparse's own usage errors exit 2 too); 3 the operating system refused (disk full, read-only folder, I/O
error, a lock held by another run: one line).
"""

from __future__ import annotations

__all__ = [
    "UserError", "InvalidArgument", "InvalidFile", "MissingFile", "OutputExists", "NotWritable",
    "BackendUnavailableError", "WeightsUnavailableError", "InternalError",
    "EXIT_OK", "EXIT_BUG", "EXIT_USER_ERROR", "EXIT_SYSTEM",
]

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER_ERROR = 2
EXIT_SYSTEM = 3


class UserError(Exception):
    """Bad input from the user. Its message is one line naming the argument or file and what was wrong."""


class InvalidArgument(UserError, ValueError):
    """An argument (CLI option or API parameter) has a wrong value, type or shape."""


class InvalidFile(UserError, ValueError):
    """A file or folder the user gave exists but is not what it must be (damaged, wrong format, another model's)."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class OutputExists(UserError, FileExistsError):
    """An output would replace something that is already there (pass the command's --overwrite to replace it)."""


class NotWritable(UserError, PermissionError):
    """An output path cannot be written."""


class BackendUnavailableError(UserError, RuntimeError):
    """The requested backend is not built, not installed, or cannot run on the given tensors."""


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained weights cannot be fetched (offline, unknown tag): names the cache path or file option to use."""


class InternalError(RuntimeError):
    """An invariant inside fastcbm failed: a bug, never the user's input. Never caught by the CLI."""
