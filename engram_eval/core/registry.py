"""Registries: one table per kind of extension point, mapping the name a user types to the implementation registered
under it where it is implemented (`@INJECTIONS.register` on the class). A table feeds its option's click choices,
its validation (engram_eval.core.spec) and its documentation, so a new mode is one class and its test.

The tables live here, below everything that uses them; each lists its entries' names, so that a command checks the
name a user typed before it imports anything heavy, and names the module that implements them, imported on first use
of an entry (its help or its class), never before. A name registered but not listed, or listed but never registered,
is refused (the table's test)."""

from __future__ import annotations

from importlib import import_module
from typing import Any, Generic, Iterator, TypeVar

from .errors import EngramEvalError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, option: str, module: str, names: tuple[str, ...], instances: bool = True):
        self.option = option  # the command-line option (or bank field) that names an entry, for errors
        self.module = module  # where the entries are implemented (and registered)
        self._names = names  # what the implementing module registers, in this order
        self.instances = instances  # register one instance of each class (else the class itself: a factory)
        self._registered: dict[str, Any] = {}

    @property
    def _entries(self) -> dict[str, Any]:
        import_module(self.module)  # registers its entries the first time; a dictionary lookup after that
        return self._registered

    def register(self, cls: type) -> type:
        """A class decorator: the class's `name` -> one instance of it (or the class)."""
        if cls.name in self._registered:
            raise ValueError(f"{self.option}: '{cls.name}' is registered twice")
        if cls.name not in self._names:
            raise ValueError(f"{self.option}: '{cls.name}' is not among the table's names {self._names}")
        self._registered[cls.name] = cls() if self.instances else cls
        return cls

    def names(self) -> tuple[str, ...]:
        return self._names

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def check(self, name: str) -> str:
        """The name, when the table has it; else one line naming the option and the known names (imports nothing)."""
        if name not in self._names:
            raise EngramEvalError(f"{self.option}: unknown '{name}' (one of: {', '.join(self._names)})")
        return name

    def __getitem__(self, name: str) -> T:
        return self._entries[self.check(name)]

    def help(self) -> str:
        """The option's --help: each name with its entry's one-sentence summary."""
        return " ".join(f"{name}: {entry.summary}" for name, entry in self._entries.items())


INJECTIONS: Registry[Any] = Registry("--injection", "engram_eval.steer.injection",  # Injection subclasses
                                     ("prefix", "add", "actadd", "vector-add", "vector-clamp"))
POOLINGS: Registry[Any] = Registry("--pooling", "engram_eval.engram.pooling",  # Pooler subclasses
                                   ("mean", "last", "pca", "learned"), instances=False)
SCORINGS: Registry[Any] = Registry("--scoring", "engram_eval.steer.scoring",  # Scoring subclasses
                                   ("first-token", "sequence", "sequence-max", "sequence-mean"))
NULL_PREFIXES: Registry[Any] = Registry("null prefix", "engram_eval.engram.nulls",  # NullPrefix subclasses
                                        ("~gaussian", "~mean-token"))
VECTOR_FORMATS: Registry[Any] = Registry("--format", "engram_eval.vectors.formats",  # VectorFormat subclasses
                                        ("gguf", "steering-vectors", "lm-eval", "engram-eval", "safetensors", "npy"))
