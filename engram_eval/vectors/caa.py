"""Contrastive activation addition (CAA): a difference-of-means vector from positive and negative texts, read at
each decoder block's output (the site the vector is added to), as steering-vectors' train_steering_vector does.

read `last`: the last token's activation (steering-vectors' read_token_index=-1); `mean`: the mean over the text's
tokens. The vector at layer L is mean(positive) - mean(negative) over the pairs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..backend.model import LoadedModel
from ..core.errors import EngramEvalError
from .vector import SteeringVector

READS = ("last", "mean")


@dataclass(frozen=True)
class ContrastPair:
    positive: str
    negative: str


def read_pairs(path: Path) -> list[ContrastPair]:
    """A pairs file: YAML `pairs: [{positive: TEXT, negative: TEXT}, ...]`; one line naming the file and pair at fault."""
    import yaml

    from ..core.files import read_text

    try:
        content = yaml.safe_load(read_text(path, "pairs file"))
    except yaml.YAMLError as exc:
        raise EngramEvalError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(content, dict) or not isinstance(content.get("pairs"), list) or not content["pairs"]:
        raise EngramEvalError(f"{path}: expected `pairs:` with a list of {{positive: TEXT, negative: TEXT}}")
    pairs = []
    for i, pair in enumerate(content["pairs"]):
        if not isinstance(pair, dict) or set(pair) != {"positive", "negative"}:
            raise EngramEvalError(f"{path}: pair {i + 1}: needs exactly `positive` and `negative`")
        if not all(isinstance(pair[key], str) and pair[key].strip() for key in ("positive", "negative")):
            raise EngramEvalError(f"{path}: pair {i + 1}: positive and negative must be non-empty texts")
        pairs.append(ContrastPair(pair["positive"], pair["negative"]))
    return pairs


@torch.inference_mode()
def block_activations(lm: LoadedModel, text: str, layers: list[int], read: str) -> dict[int, torch.Tensor]:
    """The text's activation at the output of block L-1 for each layer L, at its last token or the mean of its
    tokens, in float32 (tokenized as the tokenizer does by default, special tokens included)."""
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"].to(lm.device)
    captured: dict[int, torch.Tensor] = {}
    blocks = lm.backend.blocks()

    def capture(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[layer] = hidden[0, -1] if read == "last" else hidden[0].mean(dim=0)
        return hook

    handles = [blocks[layer - 1].register_forward_hook(capture(layer)) for layer in layers]
    try:
        lm.backend.last_hidden(lm.backend.embed(ids))
    finally:
        for handle in handles:
            handle.remove()
    return {layer: captured[layer].float().cpu() for layer in layers}


def build_caa(lm: LoadedModel, pairs: list[ContrastPair], layers: list[int], read: str = "last") -> SteeringVector:
    if read not in READS:
        raise EngramEvalError(f"--read: unknown '{read}' (one of: {', '.join(READS)})")
    if 0 in layers:
        raise EngramEvalError("--layers: layer 0 is the embeddings; a vector acts on a block's output (1 or more)")
    total = {layer: torch.zeros(lm.hidden_size) for layer in layers}
    for pair in pairs:
        positive = block_activations(lm, pair.positive, layers, read)
        negative = block_activations(lm, pair.negative, layers, read)
        for layer in layers:
            total[layer] += positive[layer] - negative[layer]
    return SteeringVector({layer: total[layer] / len(pairs) for layer in layers},
                          model_hint=lm.family,
                          source={"format": "caa", "read": read, "pairs": len(pairs), "model": lm.name,
                                  "convention": "built here: direction.L is read at, and added to, the output of block L-1"})
