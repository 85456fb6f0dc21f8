"""One registry pattern for aggregators, attacks, defenses, models, datasets and accountants.

Example:
    >>> AGGREGATORS = Registry("aggregator")
    >>> @AGGREGATORS.register("mean")
    ... def mean(U, weights): ...
    >>> AGGREGATORS.get("mean") is mean
    True
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to callables. Unknown names raise :class:`ConfigError` listing the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, **cfg: Any) -> Any:
        """Call the registered factory ``name`` with keyword arguments ``cfg``."""
        return self.get(name)(**cfg)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
