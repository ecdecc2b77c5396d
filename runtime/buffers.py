"""Preallocated buffers per request shape, shared by every engine class."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_SHAPE_SETS = 8  # buffer sets kept per engine, one per distinct input shape (least recently used goes)


class ShapeCache(Generic[T]):
    """Least-recently-used buffers keyed by a shape key: `get(key, make)` returns the entry for
    `key`, calling `make()` the first time; past `limit` entries the oldest is dropped."""

    def __init__(self, limit: int = MAX_SHAPE_SETS):
        self.limit = limit
        self._entries: OrderedDict[Hashable, T] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        entry = self._entries[key] = make()
        if len(self._entries) > self.limit:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def shape_key(shapes) -> tuple:
    """A hashable key of {name: shape}."""
    return tuple(sorted((name, tuple(shape)) for name, shape in shapes.items()))


def empty_buffers(shapes, dtypes, device) -> dict:
    """torch.empty tensors of the given shapes and manifest dtypes on `device`."""
    import torch

    return {name: torch.empty(tuple(shape), dtype=getattr(torch, dtypes[name]), device=device)
            for name, shape in shapes.items()}
