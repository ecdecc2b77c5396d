"""One error hierarchy for kiln: every failure a user can cause is a KilnError subclass.

Messages say what was expected, what was found and what to do. Validators collect every
failure first and raise once with a table (see `format_table`). Errors that callers act on
carry the fields they need (`RequestError.field`, `QueueFullError.retry_after`), so that no
caller has to read a message to decide what to do.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence


class KilnError(Exception):
    """Base class of every error kiln raises on purpose."""


class MissingDependencyError(KilnError, ImportError):
    """An optional package is needed for this operation but is not installed."""


class OptionsError(KilnError):
    """Options given to a kiln function or command do not fit together or are out of range."""


class ModelSourceError(KilnError):
    """MODEL is not a profile, a usable diffusers folder or a reachable hub id."""


class ProfileError(KilnError):
    """A profile file or a resolved shape range is invalid."""


class ExportError(KilnError):
    """Tracing a component to ONNX or processing its graph failed."""


class ToleranceError(ExportError):
    """An engine or ONNX graph disagrees with PyTorch beyond the tolerance."""


class BuildError(KilnError):
    """Building an engine or an artifact folder failed."""


class DiskFullError(KilnError):
    """A folder's file system has no room for what is being written to it."""

    def __init__(self, folder, needed: int | None, free: int):
        need = f"about {needed / 2**20:.0f} MiB" if needed else "more room"
        super().__init__(f"no space left for {folder}: it needs {need} and {free / 2**20:.0f} MiB are free there. "
                         "Free some space or write the output to another disk")
        self.folder, self.needed, self.free = folder, needed, free


class ForeignOutputError(KilnError):
    """The output path holds something kiln did not make; kiln never replaces it."""


class BusyError(KilnError):
    """Another process is writing the same output right now."""


class ArtifactError(KilnError):
    """An artifact folder is missing, altered, truncated or of an unknown format."""


class NotSupportedError(KilnError):
    """Something the diffusers pipeline does that engines cannot; the message names what to do instead."""


class RequestError(KilnError):
    """A request that these engines cannot serve as asked; `field` names the offending argument
    (None when no single argument is to blame)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ShapeError(RequestError):
    """A request does not fit the shape ranges the engines were built for."""


class SchedulerError(RequestError):
    """An unknown scheduler name, or one that cannot drive this model."""

    def __init__(self, message: str, field: str | None = "scheduler"):
        super().__init__(message, field)


class FatalEngineError(KilnError):
    """An engine failed in a way this process cannot recover from (e.g. a sticky CUDA error)."""


class ServiceError(KilnError):
    """The service cannot take this request now; the request itself may be fine."""


class ShuttingDownError(ServiceError):
    """The service is draining before it stops; retry on another replica."""


class QueueFullError(ServiceError):
    """The request queue is full; retry after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: float):
        super().__init__(f"the request queue is full ({depth} waiting); retry in {retry_after:.0f} s")
        self.depth = depth
        self.retry_after = retry_after


class ServiceUnavailableError(ServiceError):
    """No kiln service answers at the address given."""


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Render rows as a plain left-aligned text table (used by errors and the CLI)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
