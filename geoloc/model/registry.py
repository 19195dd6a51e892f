"""One small name -> builder registry, shared by the model and the loss registries.

A component is chosen by a config string through `Registry.get`, never through an
if/elif chain in the training loop; an unknown name is a `ConfigError` listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from geoloc.errors import ConfigError

__all__ = ["Registry"]

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """Builders of one kind of component (`kind` names it in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the builder under `name`; a name is taken at most once."""

        def deco(fn: T) -> T:
            if name in self._builders:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._builders[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def get(self, name: str) -> T:
        """The builder registered as `name`; `ConfigError` listing the valid names otherwise."""
        if name not in self._builders:
            raise ConfigError(
                f"unknown {self.kind} '{name}'; valid names: {', '.join(self.names())}"
            )
        return self._builders[name]
