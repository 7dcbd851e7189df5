"""A stored engram as a steering vector: at each layer, the mean of its k raw vectors (actadd's direction before it is
normalised), to be added where the engram was read, the output of block L-1."""

from __future__ import annotations

import torch

from ..core.errors import EngramEvalError
from ..engram.files import StoreFiles
from .vector import SteeringVector


def engram_vector(store_dir: str, name: str, layers: list[int] | None, model_type: str | None) -> SteeringVector:
    """The engram named `name` (source name, file name or key, as `store show`) -> a vector over its layers 1..L (or
    `layers`), its magnitude that of the mean hidden state."""
    files = StoreFiles.existing(store_dir)
    found = files.find(name)
    if len(found) != 1:
        raise EngramEvalError(f"--engram: {'no' if not found else len(found)} engrams in {store_dir} match '{name}'"
                              f"{'' if not found else ' (name one by its key)'}")
    arrays, metadata = files.read_layers(found[0])
    stored = {layer: torch.from_numpy(array) for layer, array in arrays.items()}
    wanted = layers if layers is not None else [layer for layer in sorted(stored) if layer > 0]
    missing = [layer for layer in wanted if layer not in stored or layer == 0]
    if missing:
        raise EngramEvalError(f"--layers: engram '{name}' has no layer {missing[0]} a vector can act at (it has "
                              f"{', '.join(str(layer) for layer in sorted(stored) if layer > 0)})")
    return SteeringVector({layer: stored[layer].float().mean(dim=0) for layer in wanted}, model_hint=model_type,
                          source={"format": "engram", "engram": metadata["key"], "engram_source": metadata["source_name"],
                                  "model": metadata["model"], "chunks": int(metadata["chunks"]),
                                  "convention": "an engram's layer L is hidden_states[L]; its mean is added there"})
