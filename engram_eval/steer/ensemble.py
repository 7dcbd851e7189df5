"""Temporal ensembling while decoding (`generate --ensemble M --ensemble-decay m`) and prompt-conditioned engrams
(`--reextract`): the Action Chunking Transformer's recipe, with engrams for action chunks.

At decode step t the cell's engram is (with re-extraction) extracted again from its source read after the current
state, the prompt and the tokens generated so far; the next-token distribution is the weighted mean of the softmax
distributions under the newest M engrams, each injected as the cell's (same injection, scaling, strength) before the
whole current context, with ACT's weights w_i = exp(-m i), i = 0 the newest, normalised; greedy argmax of the mean.
No KV cache: every step runs the whole context under each engram of the window."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..backend.model import LoadedModel
from ..bank.expressions import Expression
from ..core.spec import Ensembling, Extraction, Method
from ..engram.extraction import extract_engrams, read_after
from .grid import Cell
from .injection import CellVectors, Steering

def ensemble_weights(ensembling: Ensembling, n: int) -> torch.Tensor:
    """w_i = exp(-m i) for the newest n engrams (i = 0 the newest), normalised to sum 1 (float64)."""
    w = torch.exp(-ensembling.decay * torch.arange(n, dtype=torch.float64))
    return w / w.sum()


@dataclass
class EnsembleJob:
    """One cell's ensembled generation: the cell and its sweep-time raw vectors; to re-extract, its engram as weighted
    sources with their token ids (None: a null prefix, which has no source and stays as it is)."""

    cell: Cell
    vectors: torch.Tensor
    method: Method
    ensembling: Ensembling
    extraction: Extraction
    expression: Expression | None = None
    source_ids: dict[str, tuple[list[int], bool]] = field(default_factory=dict)

    def to(self, device: torch.device) -> EnsembleJob:
        return replace(self, vectors=self.vectors.to(device))


def reextracted(lm: LoadedModel, job: EnsembleJob, state: list[int]) -> torch.Tensor:
    """The cell's raw vectors from its sources read after the state (an expression: its terms combined)."""
    layer, k = job.cell.layer, job.cell.chunks

    def one(source: str) -> torch.Tensor:
        ids, truncated = job.source_ids[source]
        conditioned, extraction = read_after(lm, state, ids, job.extraction)
        return extract_engrams(lm, conditioned, truncated, [layer], [k], extraction, source)[k].layers[layer]

    return job.expression.combine(one)


def step_steering(lm: LoadedModel, job: EnsembleJob, raw: torch.Tensor, prompt_ids: tuple[int, ...],
                  norms: dict[int, float]) -> Steering:
    """The cell's one-row steering from these raw vectors, scaled as the sweep scales it (norms: actadd's s, measured
    once of the prompt)."""
    key = (job.cell.vectors_name, job.cell.layer, job.cell.chunks)
    return CellVectors(lm, {key: raw}, job.method, prompt_ids, [job.cell], norms).steering([job.cell])


@torch.inference_mode()
def next_distribution(lm: LoadedModel, window: list[Steering], context: list[int], prompt_end: int,
                      weights: torch.Tensor) -> torch.Tensor:
    """The weighted mean of the next-token softmax distributions after `context` under each steering of the window
    (newest first), all in one batch -> [vocab] float64."""
    backend = lm.backend
    first = window[0]
    batch = Steering(first.mode, torch.cat([s.vectors for s in window]), [layer for s in window for layer in s.layers],
                     first.positions, prompt_end, first.start)
    body = backend.embed(torch.tensor(context, device=lm.device)).unsqueeze(0).expand(len(window), -1, -1)
    with batch.active(backend):
        hidden = backend.last_hidden(batch.inputs(body))
    probs = torch.softmax(backend.logits(hidden[:, -1, :].contiguous()).double(), dim=-1)
    return (weights.to(probs.device).unsqueeze(1) * probs).sum(dim=0)


def ensembled_tokens(lm: LoadedModel, prompt_ids: tuple[int, ...], job: EnsembleJob,
                     max_new_tokens: int) -> tuple[list[int], bool]:
    """Greedy decoding under the ensemble -> (the generated ids, whether EOS ended it; EOS is not among the ids)."""
    ensembling, stops = job.ensembling, lm.backend.eos_token_ids()
    norms = job.method.mode.residual_norms(lm, prompt_ids, [job.cell.layer], job.method.scaling)  # the prompt's: the same every step
    tokens: list[int] = []
    window: list[Steering] = []
    for _ in range(max_new_tokens):
        state = [*prompt_ids, *tokens]
        fresh = ensembling.reextract and job.expression is not None
        raw = reextracted(lm, job, state) if fresh else job.vectors
        window = [step_steering(lm, job, raw, prompt_ids, norms) if fresh or not window else window[0], *window][: ensembling.size]
        probs = next_distribution(lm, window, state, len(prompt_ids), ensemble_weights(ensembling, len(window)))
        token = int(probs.argmax())
        if token in stops:
            return tokens, True
        tokens.append(token)
    return tokens, False
