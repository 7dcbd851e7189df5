"""Learned engrams (`--pooling learned`): the upper bound on what k prefix vectors can carry of a source.

k vectors in the input-embedding space start from the layer-L chunk-mean engram scaled by the seed's rule at strength 1
and are optimised against the frozen model with AdamW, projected after every step so that their mean row norm is the
embedding norm (the seed's scale at strength 1: the sweep's global scaling then multiplies them by the strength alone).

Objectives: `reconstruct` (Cramming): the mean teacher-forced cross-entropy of the source's tokens after the k vectors,
the first token predicted at the last vector's position. `distill` (Cartridges' context distillation): the mean over
probe prompts and their positions of KL(p(. | source + "\\n\\n" + probe) || p(. | vectors + probe)). The bank's
questions are never used for training. Training stops after `steps` updates, or earlier once the loss improved by less
than PLATEAU_DELTA over PLATEAU_STEPS steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..backend.model import LoadedModel
from ..core.progress import progress_bar
from ..core.spec import Extraction
from .files import learn_probes

BETAS = (0.9, 0.9)  # Cramming's AdamW betas; no weight decay (the projection fixes the norm)
PLATEAU_STEPS, PLATEAU_DELTA = 20, 1e-4
SEPARATOR = "\n\n"

Objective = Callable[[torch.Tensor], torch.Tensor]  # vectors [k, hidden] -> a float32 scalar loss


@dataclass(frozen=True)
class Learned:
    vectors: torch.Tensor  # [k, hidden], float32, mean row norm = the embedding norm
    steps: int  # updates run (fewer than asked when the loss reached its plateau)
    loss_init: float  # the objective at the initial (projected) vectors
    loss_final: float  # the objective at the stored vectors


def project(vectors: torch.Tensor, embedding_norm: float) -> torch.Tensor:
    """The vectors rescaled so that their mean row norm is the embedding norm."""
    return vectors * (embedding_norm / vectors.norm(dim=1).mean())


def reconstruct_objective(lm: LoadedModel, ids: list[int]) -> Objective:
    """Mean cross-entropy of the source's tokens given [vectors; embed(source)]: position k-1+i predicts token i."""
    targets = torch.tensor(ids, device=lm.device)
    with torch.no_grad():
        body = lm.backend.embed(targets)

    def loss(vectors: torch.Tensor) -> torch.Tensor:
        k = vectors.shape[0]
        hidden = lm.backend.last_hidden(torch.cat([vectors.to(body.dtype), body]).unsqueeze(0))[0]
        return F.cross_entropy(lm.backend.logits(hidden[k - 1 : k - 1 + len(ids)]), targets)

    return loss


def distill_objective(lm: LoadedModel, ids: list[int], probes: tuple[str, ...]) -> Objective:
    """Mean over every probe position of KL(teacher || student): the teacher reads source + separator + probe, the
    student the vectors + probe; both distributions after each probe token."""
    separator = lm.tokenizer.encode(SEPARATOR, add_special_tokens=False)
    probe_ids = [lm.tokenizer.encode(probe, add_special_tokens=False) for probe in probes]
    teachers, bodies = [], []
    with torch.no_grad():
        for probe in probe_ids:
            read = torch.tensor(ids + separator + probe, device=lm.device)
            hidden = lm.backend.last_hidden(lm.backend.embed(read).unsqueeze(0))[0, -len(probe):]
            teachers.append(torch.log_softmax(lm.backend.logits(hidden), dim=-1))
            bodies.append(lm.backend.embed(torch.tensor(probe, device=lm.device)))

    def loss(vectors: torch.Tensor) -> torch.Tensor:
        k = vectors.shape[0]
        total, positions = vectors.new_zeros(()), 0
        for teacher, body in zip(teachers, bodies):
            hidden = lm.backend.last_hidden(torch.cat([vectors.to(body.dtype), body]).unsqueeze(0))[0, k:]
            student = torch.log_softmax(lm.backend.logits(hidden), dim=-1)
            total = total + F.kl_div(student, teacher, log_target=True, reduction="sum")
            positions += body.shape[0]
        return total / positions

    return loss


def objective_for(lm: LoadedModel, ids: list[int], extraction: Extraction) -> Objective:
    """The extraction's objective for one source (ids), built once for all its layers and k: its tensors are made
    outside inference mode, so autograd can use them."""
    with torch.inference_mode(False):
        if extraction.learn_objective == "distill":
            return distill_objective(lm, ids, learn_probes(extraction))
        return reconstruct_objective(lm, ids)


def learn_vectors(lm: LoadedModel, initial: torch.Tensor, objective: Objective, extraction: Extraction,
                  description: str = "learn") -> Learned:
    """The optimised vectors from a source's initial chunk means [k, hidden], scaled to the embedding norm first,
    against its objective (objective_for). The seed seeds torch's generator while learning: neither objective draws
    from it, so it is recorded for objectives that will."""

    norm = lm.embedding_norm
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(extraction.learn_seed)
        vectors = project(initial.detach().float().clone().to(lm.device), norm).requires_grad_(True)
        optimizer = torch.optim.AdamW([vectors], lr=extraction.learn_lr, betas=BETAS, weight_decay=0.0)
        with torch.no_grad():
            loss_init = objective(vectors).item()
        history: list[float] = []
        with progress_bar(extraction.learn_steps, description, "step", leave=False) as bar:
            for _ in range(extraction.learn_steps):
                loss = objective(vectors)
                (vectors.grad,) = torch.autograd.grad(loss, [vectors])
                optimizer.step()
                with torch.no_grad():
                    vectors.copy_(project(vectors, norm))
                history.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{history[-1]:.4f}")
                if len(history) > PLATEAU_STEPS and history[-1 - PLATEAU_STEPS] - history[-1] < PLATEAU_DELTA:
                    break
        with torch.no_grad():
            loss_final = objective(vectors).item()
    return Learned(vectors.detach().cpu(), len(history), loss_init, loss_final)
