"""One registry type for everything chosen by name in a config: fills, mask kinds, masking
methods, donors, control holes, probes and datasets.

Registering::

    from masktrain.fills import FILLS            # any Registry
    FILLS.register("mine", spec)                 # as a call
    @MASK_KINDS.register("stripes")              # or as a decorator (returns the object unchanged)
    def stripes(batch_size, size, generator, device="cpu", **params): ...

Registering a name twice replaces the first entry with a ``RuntimeWarning`` (so a plugin can
override a built-in deliberately, and an accidental clash is visible). Looking up an unknown
name raises one :class:`~masktrain.errors.UserError` that names the config key and lists the
choices, e.g. ``methods='gray': masking method 'gray' is unknown; choose one of [black, grey, ...]``.

A registry can ``include`` another one through an adapter, so that its names are the union
of both, resolved when looked up (masking methods include every fill, also fills registered
after the methods module was imported).
"""
from __future__ import annotations

import warnings
from typing import Callable, Generic, Iterator, TypeVar

from masktrain.errors import UserError

T = TypeVar("T")
_MISSING = object()


class Registry(Generic[T]):
    """Named objects of one ``kind`` (used in messages), chosen by the config key ``config_key``."""

    def __init__(self, kind: str, config_key: str) -> None:
        self.kind, self.config_key = kind, config_key
        self._items: dict[str, T] = {}
        self._included: list[tuple["Registry", Callable[[str, object], T]]] = []

    def register(self, name: str, obj=_MISSING):
        """``register(name, obj)`` stores ``obj``; ``@register(name)`` stores the decorated object."""
        if obj is _MISSING:
            def decorate(o):
                self.register(name, o)
                return o

            return decorate
        name = str(name)
        if name in self._items:
            warnings.warn(f"{self.kind} {name!r} registered again; the new one replaces the old", RuntimeWarning, stacklevel=2)
        self._items[name] = obj
        return obj

    def remove(self, name: str) -> None:
        """Forget ``name`` (e.g. a plugin registered by a test)."""
        self.get(name)
        self._items.pop(str(name), None)

    def include(self, other: "Registry", adapt: Callable[[str, object], T]) -> None:
        """Also offer every name of ``other`` (looked up live), turned into an entry by ``adapt(name, obj)``."""
        self._included.append((other, adapt))

    def get(self, name: str) -> T:
        """The entry ``name``; a UserError naming :attr:`config_key` and the choices otherwise."""
        name = str(name)
        if name in self._items:
            return self._items[name]
        for other, adapt in self._included:
            if name in other:
                return adapt(name, other.get(name))
        raise UserError(f"{self.config_key}={name!r}: {self.kind} {name!r} is unknown; choose one of [{', '.join(self.names())}]")

    def names(self) -> list[str]:
        """All names, in registration order (own entries first, then included ones)."""
        out = list(self._items)
        for other, _ in self._included:
            out += [n for n in other.names() if n not in out]
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._items or any(name in other for other, _ in self._included)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def items(self) -> list[tuple[str, T]]:
        return [(n, self.get(n)) for n in self.names()]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.config_key!r}: {self.names()})"
