"""One small registry type shared by every extension point (passes, rounders, targets, stages)."""
from __future__ import annotations

from typing import Callable, Generic, Hashable, Iterator, TypeVar

from onnxflex.errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → object map. Registering a name twice raises; lookups of unknown names list the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[Hashable, T] = {}

    def register(self, key: Hashable) -> Callable[[T], T]:
        """Decorator: `@REG.register("name")` stores the object and returns it unchanged."""

        def decorate(obj: T) -> T:
            if key in self._items:
                raise RegistryError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return decorate

    def get(self, key: Hashable) -> T:
        try:
            return self._items[key]
        except KeyError:
            known = ", ".join(sorted(map(str, self._items))) or "none"
            raise RegistryError(f"unknown {self.kind} {key!r}; known: {known}") from None

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._items)

    def names(self) -> list[str]:
        return sorted(map(str, self._items))
