"""Every error a user can fix, in one hierarchy; the CLI prints them as one line.

Library messages name the *parameter* to change with ``option(name)``, never a CLI flag:
``str(error)`` shows it as the Python API spells it (``overwrite=True``), and the CLI shows it as
its flag (``--overwrite``) through ``CharRNNError.render``.
"""

from __future__ import annotations

import re

_MARK = "\x00"  # cannot occur in a path or in text we quote, so markers are unambiguous
_OPTION = re.compile(f"{_MARK}([a-z_]+)(?:=([^{_MARK}]*))?{_MARK}")


def option(name: str, value: str | bool | None = None) -> str:
    """Names a parameter inside an error message.

    Args:
        name: the keyword argument's name, e.g. ``overwrite``.
        value: the value to suggest, or None to name the parameter only.

    Returns:
        A marker that ``str(error)`` and ``CharRNNError.render`` spell out.
    """
    return f"{_MARK}{name}{'' if value is None else '=' + str(value)}{_MARK}"


def _python_spelling(name: str, value: str | None) -> str:
    if value is None:
        return name
    return f"{name}={value}" if value in ("True", "False") else f"{name}={value!r}"


class CharRNNError(Exception):
    """Bad input or state that the user can fix; the message says what and how.

    ``exit_code`` is the status the CLI exits with.
    """

    exit_code = 2

    def __str__(self) -> str:
        return self.render(_python_spelling)

    def render(self, spell) -> str:
        """Returns the message with each ``option`` marker spelled by ``spell(name, value)``."""
        text = str(self.args[0]) if self.args else ""
        return _OPTION.sub(lambda m: spell(m.group(1), m.group(2)), text)


class InputError(CharRNNError, ValueError):
    """An argument, file or setting that cannot be used."""


class ConfigError(InputError):
    """A config file or override that cannot be used; the message says which key and why."""


class DataError(InputError):
    """A corpus that cannot be used; the message names the file or the numbers involved."""


class VocabError(InputError):
    """A vocabulary file that cannot be read, or text it cannot encode."""


class RunDirError(InputError):
    """A run directory that is missing, incomplete, damaged or in use."""


class BackupError(RunDirError):
    """A training backup that cannot be restored; the message names the files and what to do."""


class SamplingError(InputError):
    """Generation settings that cannot be used; the message shows the value received."""


class ServingError(InputError):
    """An export directory, model name, version or server address that cannot be used."""


class StorageError(CharRNNError):
    """A write that the file system refused (full disk, read-only directory, permissions)."""

    exit_code = 1


class TrainingStopped(CharRNNError):
    """Training ended without finishing (a non-finite loss); the run keeps its checkpoints."""

    exit_code = 1  # a run that failed, not a usage error (2)


class DistributeError(CharRNNError):
    """Workers of one distributed run that cannot train together (disagree, unreachable)."""

    exit_code = 1


class Interrupted(CharRNNError):
    """Ctrl-C or SIGTERM; the message says how to continue."""

    exit_code = 130  # what a shell reports for a process stopped by SIGINT
