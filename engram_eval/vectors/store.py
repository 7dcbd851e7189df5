"""The vector store: STORE/vectors/NAME.safetensors, one file per imported, built or exported vector."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import EngramEvalError
from .vector import SteeringVector

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class StoredVector:
    name: str
    vector: SteeringVector
    path: Path

    def record(self) -> dict:
        """What run.json says of the vector a run steers with."""
        return {"name": self.name, "file": str(self.path.resolve()), "sha256": self.vector.sha256,
                "layers": self.vector.layers, "action": self.vector.action,
                "norms": {str(layer): round(float(v.norm()), 6) for layer, v in self.vector.directions.items()},
                "model_hint": self.vector.model_hint, "source": self.vector.source}


class VectorStore:
    """Imported, built and exported vectors, one file each: STORE/vectors/NAME.safetensors."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dir = self.root / "vectors"

    def path(self, name: str) -> Path:
        return self.dir / f"{check_name(name)}.safetensors"

    def names(self) -> list[str]:
        return sorted(p.name.removesuffix(".safetensors") for p in self.dir.glob("*.safetensors")) if self.dir.is_dir() else []

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def save(self, name: str, vector: SteeringVector, force: bool = False) -> Path:
        path = self.path(name)
        if path.exists() and not force:
            raise EngramEvalError(f"{path}: a vector named '{name}' is already stored (--force replaces it)")
        self.dir.mkdir(parents=True, exist_ok=True)
        vector.save(path)
        return path

    def load(self, name: str) -> StoredVector:
        path = self.path(name)
        if not path.is_file():
            known = ", ".join(self.names()) or "none"
            raise EngramEvalError(f"--vector: no vector named '{name}' in {self.dir} (stored: {known}; "
                                  "`engram-eval vectors import` or `vectors build` adds one)")
        return StoredVector(name, SteeringVector.load(path), path)


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise EngramEvalError(f"--name: '{name}' is not a vector name (letters, digits, '_', '.', '-'; not starting with "
                              "a punctuation mark)")
    return name


def check_vector_layers(stored: StoredVector, num_layers: int, hidden_size: int, layers: list[int]) -> None:
    """The vector must fit the model, and the layers a sweep steers at must be the vector's."""
    stored.vector.check_model(str(stored.path), num_layers, hidden_size, None)
    missing = [layer for layer in layers if layer not in stored.vector.directions]
    if missing:
        raise EngramEvalError(f"--layers: vector '{stored.name}' has no direction at layer {missing[0]} (it carries "
                              f"{', '.join(map(str, stored.vector.layers))}; engram-eval's numbering)")
