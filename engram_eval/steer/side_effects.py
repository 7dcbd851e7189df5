"""The neutral-text probe (`sweep --neutral`): what a cell does to the model away from any question.

A neutral passage is run teacher-forced with a cell's engram injected exactly as before a question's prompt (prefix:
the k vectors before it; add: on its first k tokens; actadd: at every position, s measured over the passage) and
without it. Per cell: the mean over the passage's n positions of KL(p_unsteered || p_steered) of the next-token
distribution, and the perplexity ratio steered / unsteered over its n - 1 next tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ..backend.model import LoadedModel
from ..bank.passages import NeutralPassage
from ..core.errors import EngramEvalError
from ..core.spec import Method
from .injection import CellVectors, Steering, engram_start
from .scoring import auto_batch_size, in_batches, kl_divergence

if TYPE_CHECKING:
    from .grid import Cell

MIN_TOKENS = 16


def passage_ids(lm: LoadedModel, passage: NeutralPassage, method: Method, chunks: list[int]) -> tuple[int, ...]:
    """The passage tokenized as a source is (the tokenizer's default special tokens, no chat template); it must have
    MIN_TOKENS tokens, and add injection's k (after a BOS the engram goes after)."""
    ids = tuple(lm.tokenizer(passage.text)["input_ids"])
    injection = method.injection
    start = engram_start(lm, method, ids)
    least = max(MIN_TOKENS, max(chunks) + start) if method.mode.needs_k_prompt_tokens else MIN_TOKENS
    if len(ids) < least:
        reason = f"--injection {injection} with k = {max(chunks)} needs" if least > MIN_TOKENS else "the probe needs"
        raise EngramEvalError(f"--neutral {passage.label}: the passage has {len(ids)} tokens; {reason} at least {least}")
    if lm.max_positions is not None and len(ids) + max(chunks) > lm.max_positions:
        raise EngramEvalError(f"--neutral {passage.label}: the passage has {len(ids)} tokens; with the engram's "
                              f"{max(chunks)} positions that is more than the model's {lm.max_positions}")
    return ids


@torch.inference_mode()
def passage_logprobs(lm: LoadedModel, steering: Steering | None, ids: tuple[int, ...]) -> torch.Tensor:
    """The next-token log-probabilities at each of the passage's n positions [batch, n, vocab], float32."""
    backend = lm.backend
    body = backend.embed(torch.tensor(ids, device=lm.device)).unsqueeze(0)
    if steering is None:
        hidden = backend.last_hidden(body)
    else:
        with steering.active(backend):
            hidden = backend.last_hidden(steering.inputs(body.expand(steering.vectors.shape[0], -1, -1)))
    n = len(ids)
    where = list(range(n)) if steering is None else steering.body_positions(n)  # the passage's positions, not the engram's
    last = hidden[:, where, :].reshape(-1, hidden.shape[-1]).contiguous()
    return torch.log_softmax(backend.logits(last).view(hidden.shape[0], n, -1), dim=-1)


def mean_nll(logp: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """Mean negative log-likelihood of tokens 1..n-1 from positions 0..n-2 -> [batch]."""
    targets = torch.tensor(ids[1:], device=logp.device).expand(logp.shape[0], -1).unsqueeze(-1)
    return -logp[:, :-1].gather(-1, targets).squeeze(-1).mean(dim=-1)


def side_effects(lm: LoadedModel, cells: list[Cell], raw: dict[tuple[str, int, int], torch.Tensor], method: Method,
                 ids: tuple[int, ...], batch_size: int | None,
                 on_batch: Callable[[int], None] = lambda n: None) -> dict[str, list[float]]:
    """Each cell's neutral_kl and neutral_ppl_ratio, in cell order (the caller passes each injection once)."""
    unsteered = passage_logprobs(lm, None, ids)  # [1, n, vocab]
    unsteered_nll = mean_nll(unsteered, ids)
    vectors = CellVectors(lm, raw, method, ids, cells)  # the passage is the prompt
    prefix = method.prefix_length([c.chunks for c in cells])
    kl: list[float] = []
    ratio: list[float] = []

    def work(batch: list[Cell]) -> None:
        logp = passage_logprobs(lm, vectors.steering(batch), ids)
        divergence, nll = kl_divergence(unsteered, logp).mean(dim=-1), mean_nll(logp, ids)
        kl.extend(divergence.tolist())  # only once the batch is whole: out-of-memory retries it from the start
        ratio.extend(torch.exp(nll - unsteered_nll).tolist())

    order, _ = in_batches(lm, cells, batch_size or auto_batch_size(lm, prefix + len(ids), len(cells)), work, on_batch)
    position = {i: n for n, i in enumerate(order)}  # computed in batch order; back to cell order
    return {"neutral_kl": [kl[position[i]] for i in range(len(cells))],
            "neutral_ppl_ratio": [ratio[position[i]] for i in range(len(cells))]}
