"""Registries: one table per kind of extension point (an injection mode, ...), mapping the name a user types to the
implementation registered under it where it is implemented. The table feeds the option's click choices, its
validation and its documentation, so a new mode is one class and its test."""

from __future__ import annotations

from typing import Generic, TypeVar

from .errors import EngramEvalError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, option: str):
        self.option = option  # the command-line option that names an entry, for errors
        self._entries: dict[str, T] = {}

    def register(self, cls: type[T]) -> type[T]:
        """A class decorator: the class's `name` -> one instance of it."""
        if cls.name in self._entries:
            raise ValueError(f"{self.option}: '{cls.name}' is registered twice")
        self._entries[cls.name] = cls()
        return cls

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise EngramEvalError(f"{self.option}: unknown '{name}' (one of: {', '.join(self._entries)})") from None

    def help(self) -> str:
        """The option's --help: each name with its entry's one-sentence summary."""
        return " ".join(f"{name}: {entry.summary}" for name, entry in self._entries.items())
