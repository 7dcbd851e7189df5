"""The engram scale as the model receives it (METHOD.md, Injection 1): the mean norm vocabulary tokens have where the
prefix enters the model, the input of the first decoder block, measured through the model.

A prefix enters as `inputs_embeds`, which skips whatever the embedding module does to token ids (Gemma multiplies its
rows by sqrt(hidden_size) there) and passes whatever the model does to `inputs_embeds` afterwards (Granite's
embedding_multiplier, MiniCPM's scale_emb: applied to tokens and prefix alike; GPT-2's learned positions: added to
both). So, at the first block's input, with position 0's own contribution (the input there of an all-zero
`inputs_embeds`) taken away:

    token_norm = mean over the vocabulary of |block input(token id)| / gain,
    gain       = mean |block input(weight rows as inputs_embeds)| / mean |weight row|

and a prefix of mean norm `strength x token_norm` arrives at the first block with `strength` times the mean norm of
real tokens there. Where nothing happens between the embedding and the first block (Llama, Qwen2, SmolLM2) every
step is the identity and token_norm is the seeds' mean row norm of the embedding matrix, to the bit."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..core.errors import EngramEvalError
from .interface import Backend

DEFINITION = ("mean norm of the vocabulary's tokens at the first decoder block's input (position embeddings left out), "
              "divided by the gain from inputs_embeds to that input: the norm a prefix vector needs to arrive there like "
              "a real token")
BATCH = 4096  # vocabulary rows per forward pass (each stops at the first block)


@dataclass(frozen=True)
class EmbeddingScale:
    token_norm: float  # the engram scale's numerator: what a prefix row's norm is at strength 1
    weight_row_norm: float  # the seeds' rule: the mean row norm of the input embedding matrix
    gain: float  # the first block's input per unit of inputs_embeds (1: inputs_embeds arrive as they are)

    @property
    def token_to_weight(self) -> float:
        """What the embedding module multiplies its rows by, as measured (1 where it returns them unchanged)."""
        return self.token_norm / self.weight_row_norm

    def record(self) -> dict:
        """run.json's `embedding_scale`: the numbers and their definition."""
        return {**asdict(self), "definition": DEFINITION}


class _Reached(Exception):
    """Raised by the first block's pre-hook: nothing after its input is needed."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def first_block_input(backend: Backend, ids: torch.Tensor | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
    """What the first decoder block receives at position 0 for token ids [batch, 1] (through the embedding module) or
    for inputs_embeds [batch, 1, hidden] -> [batch, hidden], float32. The forward pass stops there."""

    def hook(module, args, kwargs):
        raise _Reached(args[0] if args else kwargs["hidden_states"])

    handle = backend.blocks()[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        backend.hidden_states(ids) if embeds is None else backend.last_hidden(embeds)
    except _Reached as reached:
        return reached.hidden[:, 0, :].float()
    finally:
        handle.remove()
    raise EngramEvalError("the first decoder block never ran")


@torch.inference_mode()
def measure_embedding_scale(backend: Backend, batch: int = BATCH) -> EmbeddingScale:
    """The engram scale of this model, measured through it over every row of its input embedding matrix."""
    weight = backend.embedding_matrix()
    rows, hidden = weight.shape
    device = weight.device
    baseline = first_block_input(backend, embeds=torch.zeros(1, 1, hidden, device=device, dtype=weight.dtype))
    tokens, weights, arrived = [], [], []
    for start in range(0, rows, batch):
        ids = torch.arange(start, min(rows, start + batch), device=device)
        x = weight[ids]
        tokens.append((first_block_input(backend, ids=ids[:, None]) - baseline).norm(dim=1))
        weights.append(x.float().norm(dim=1))
        arrived.append((first_block_input(backend, embeds=x[:, None, :]) - baseline).norm(dim=1))
    weight_norm = torch.cat(weights).mean()
    gain = torch.cat(arrived).mean() / weight_norm
    return EmbeddingScale(token_norm=(torch.cat(tokens).mean() / gain).item(), weight_row_norm=weight_norm.item(),
                          gain=gain.item())
