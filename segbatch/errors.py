"""Every error segbatch raises on purpose. Each says what to do next.

Errors that mean "the job as asked cannot start" subclass :class:`SegbatchUsageError` and make the
CLI exit with code 2 before any Ray work begins. Errors about one input file never escape a worker:
they become a row with ``status='error'``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SegbatchError(Exception):
    """Base of every segbatch error."""


class SegbatchUsageError(SegbatchError):
    """The job cannot start as configured; the CLI exits with code 2."""


class ConfigError(SegbatchUsageError, ValueError):
    """A job file or --set value is invalid."""


class UnknownKeyError(ConfigError, KeyError):
    """A configuration key that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InputNotFoundError(SegbatchUsageError, FileNotFoundError):
    """An input URI does not exist, or matched no image."""


class StorageAccessError(SegbatchUsageError, OSError):
    """The storage behind a URI cannot be reached or refuses the job's credentials (an endpoint
    that does not answer, no credentials, access denied), found on the driver before Ray starts.
    """

    def __str__(self) -> str:  # OSError would print its errno fields
        return str(self.args[0])


class OutputExistsError(SegbatchUsageError, FileExistsError):
    """The output root holds files and --overwrite was not given."""


class NotSegbatchOutputError(SegbatchUsageError, FileNotFoundError):
    """--resume names an output root without ``job.yaml``: no segbatch run to continue."""


class OutputPathError(SegbatchUsageError, NotADirectoryError):
    """The output root would be created below a regular file."""


class OutputNotWritableError(SegbatchUsageError, PermissionError):
    """The output root (or the folder it would be created in) cannot be written."""


class UnsafePathError(SegbatchError, ValueError):
    """An output path would land outside the output root."""


class MissingDependencyError(SegbatchUsageError, ImportError):
    """An optional package is needed; the message names the extra to install."""


class UnknownModelError(SegbatchUsageError, ValueError):
    """A model name that is neither registered nor ``module:callable``."""


class WeightsError(SegbatchUsageError, ValueError):
    """Weights cannot be found, downloaded or matched to the model."""


class DeviceUnavailableError(SegbatchUsageError, RuntimeError):
    """The job asks for a device (a GPU) the Ray cluster does not have."""


class DecodeError(SegbatchError, ValueError):
    """One input file cannot be decoded; it becomes an error row."""


class ImageTooLargeError(DecodeError):
    """An image above the decoder's pixel limit."""


def closest(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest candidate, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def missing_dependency(package: str, extra: str, what: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"{what} needs the package {package!r}, which is not installed: "
        f"pip install 'segbatch[{extra}]'"
    )


class CheckpointNotFoundError(WeightsError, FileNotFoundError):
    """A weights checkpoint URI that does not exist."""


class UserModelError(SegbatchUsageError, ValueError):
    """A user model (``module:callable``) cannot be imported or does not build a module."""


class OutputWriteError(SegbatchError, OSError):
    """A results file could not be written (a full disk, a lost mount); the job stops, keeps
    what it wrote, and ``--resume`` continues once the output has room again."""
