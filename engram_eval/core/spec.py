"""What a sweep computes and how it executes, as frozen values (no torch here).

`SweepSpec` is the method and the grid: how engrams are extracted (`Extraction`), the layer x strength x k grid
(`Grid`) and how a cell steers and is scored (`Method`), plus which questions. `Execution` is how it runs (batch size,
threads, Ray), which never changes a number. The CLI's options build them; `check()` is every validation, run once before the
model loads (layer bounds once the model's depth is known). Names are checked against the registries
(engram_eval.core.registry), so a registered mode is valid everywhere at once.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

from .errors import EngramEvalError, EngramEvalWarning
from .registry import INJECTIONS, POOLINGS, SCORINGS

DEFAULT_CHUNKS = 16
DEFAULT_MAX_TOKENS = 2048
DEFAULT_LAYERS = (8, 12, 16, 20, 24)
DEFAULT_STRENGTHS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
SCALINGS = ("global", "per-chunk")  # an engram's (--scaling)
VECTOR_SCALINGS = ("coefficient", "norm")  # a steering vector's: --coefficients (raw multiples) or --strengths (x s)
CONTEXTS = ("with", "without", "both")
# scorings whose side is the logsumexp of its variants (Scoring.side), the others' the best variant: what the report
# applies to the answers table without importing the scorings (torch)
LOGSUMEXP_SIDES = ("sequence",)
POSITIONS = ("all", "prompt", "answer", "last")
PREFIX_PLACES = ("after-bos", "start")  # where prefix and add put the engram when the tokenizer puts a BOS token first
LEARNED_POOLING = "learned"  # the pooling whose k vectors are optimised against the model (engram_eval.engram.learned)
LEARN_OBJECTIVES = ("reconstruct", "distill")
DEFAULT_ENSEMBLE_DECAY = 0.01  # ACT's m in w_i = exp(-m i) (`generate --ensemble-decay`)


def valid_layers(num_layers: int) -> str:
    return f"valid layers are 0..{num_layers} (0 = embedding output, {num_layers} = last)"


def check_layers(layers: list[int] | tuple[int, ...], num_layers: int, option: str = "--layers") -> list[int]:
    """Layer indices against the model's depth, with the command line's message."""
    if not layers:
        raise EngramEvalError(f"{option}: no layers given; {valid_layers(num_layers)}")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= num_layers:
            raise EngramEvalError(f"{option}: layer {layer} is out of range; {valid_layers(num_layers)}")
    return list(layers)


def format_layers(layers: list[int]) -> str:
    """[0, 1, 2, 3, 8, 10, 11] -> '0-3, 8, 10-11'."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def check_chunks(chunks: int) -> int:
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise EngramEvalError(f"--chunks: must be at least 1 (got {chunks})")
    return chunks


def check_chunk_list(chunks: int | list[int] | tuple[int, ...]) -> list[int]:
    """One k, or the chunk-count grid: each at least 1, none repeated."""
    values = [chunks] if isinstance(chunks, int) else list(chunks)
    if not values:
        raise EngramEvalError("--chunks: no chunk count given")
    for k in values:
        check_chunks(k)
        if values.count(k) > 1:
            raise EngramEvalError(f"--chunks: {k} is repeated")
    return values


def check_strengths(strengths: list[float] | tuple[float, ...], option: str = "--strengths") -> list[float]:
    if not strengths:
        raise EngramEvalError(f"{option}: no strengths given")
    for strength in strengths:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) or strength == 0:
            raise EngramEvalError(f"{option}: {strength} is not allowed; strengths must be finite and not 0 (negative "
                                  "ones subtract the engram, with add and actadd injection)")
    return list(strengths)


@dataclass(frozen=True)
class Extraction:
    """How a source's hidden states become an engram, besides k: the defaults are the seed's method."""

    pooling: str = "mean"
    skip_tokens: int = 0
    window: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    # The last layer from the last block's output, before the final norm: where actadd adds its vector and measures s
    # (hidden_states[num_layers] is the final norm's output). Every other layer is the same either way.
    block_output: bool = False
    # --pooling learned: what the k vectors are optimised for, how long, how fast; distill's probe prompts (None: the
    # bundled set)
    learn_objective: str = "reconstruct"
    learn_steps: int = 200
    learn_lr: float = 1e-2
    learn_seed: int = 0
    learn_probes: tuple[str, ...] | None = None

    @property
    def is_seed(self) -> bool:
        return (self.pooling, self.skip_tokens, self.window, self.block_output) == (SEED_POOLING, 0, None, False)

    @property
    def learns(self) -> bool:
        return self.pooling == LEARNED_POOLING

    def check(self, chunks: list[int]) -> Extraction:
        POOLINGS.check(self.pooling)
        self.check_learning()
        if self.skip_tokens < 0:
            raise EngramEvalError(f"--skip-tokens: must be at least 0 (got {self.skip_tokens})")
        if self.window is not None and self.window < max(chunks):
            raise EngramEvalError(f"--window: {self.window} tokens is smaller than k = {max(chunks)}")
        return self

    def check_learning(self) -> None:
        default = SEED_EXTRACTION
        if not self.learns:
            for option, value, unset in (("--learn-objective", self.learn_objective, default.learn_objective),
                                         ("--learn-steps", self.learn_steps, default.learn_steps),
                                         ("--learn-lr", self.learn_lr, default.learn_lr),
                                         ("--learn-seed", self.learn_seed, default.learn_seed),
                                         ("--learn-probes", self.learn_probes, default.learn_probes)):
                if value != unset:
                    raise EngramEvalError(f"{option}: applies to --pooling {LEARNED_POOLING} (this is --pooling {self.pooling})")
            return
        if self.learn_objective not in LEARN_OBJECTIVES:
            raise EngramEvalError(f"--learn-objective: unknown '{self.learn_objective}' (one of: {', '.join(LEARN_OBJECTIVES)})")
        if self.learn_steps < 1:
            raise EngramEvalError(f"--learn-steps: must be at least 1 (got {self.learn_steps})")
        if not (math.isfinite(self.learn_lr) and self.learn_lr > 0):
            raise EngramEvalError(f"--learn-lr: must be finite and > 0 (got {self.learn_lr:g})")
        if self.window is not None:
            raise EngramEvalError(f"--window: does not apply to --pooling {LEARNED_POOLING} (its objective runs the whole "
                                  "source, cut at --max-tokens)")
        if self.learn_probes is not None and self.learn_objective != "distill":
            raise EngramEvalError("--learn-probes: applies to --learn-objective distill")


SEED_POOLING = Extraction.pooling
SEED_EXTRACTION = Extraction()


@dataclass(frozen=True)
class Grid:
    """The layers to inject from, the strength multipliers and the chunk counts k (one, or the chunk-count grid); and
    how many engrams to draw from each source's paraphrases (`--sample`, 0: none) with which seed."""

    layers: tuple[int, ...] = DEFAULT_LAYERS
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    chunks: tuple[int, ...] = (DEFAULT_CHUNKS,)
    samples: int = 0
    sample_seed: int = 0

    def check(self, num_layers: int | None = None) -> Grid:
        """Strengths and chunk counts; layer indices too once the model's depth is known."""
        check_strengths(self.strengths)
        check_chunk_list(self.chunks)
        if isinstance(self.samples, bool) or self.samples < 0:
            raise EngramEvalError(f"--sample: must be at least 1 (got {self.samples})")
        if self.sample_seed != 0 and not self.samples:
            raise EngramEvalError("--sample-seed: applies to --sample N")
        if num_layers is not None:
            check_layers(self.layers, num_layers)
        return self


@dataclass(frozen=True)
class Method:
    """How a cell's engram enters the model and how the answers are scored: the defaults are the seed's."""

    injection: str = "prefix"
    scaling: str = "global"
    scoring: str = "first-token"
    context: str = "with"
    record_attention: bool = False  # eager attention: its float rounding differs slightly from the default kernel
    positions: str = "all"  # where a mode that steers every position (actadd) adds its vector: POSITIONS
    reextract: bool = False  # each question's engrams extracted from the source read after its prompt (per question)
    prefix_at: str = "after-bos"  # PREFIX_PLACES: a BOS the tokenizer adds stays first (no BOS: the same as start)
    vector: str | None = None  # a stored steering vector's name (sweep --vector): the run steers with it, not engrams

    @property
    def mode(self):
        """The injection mode's class instance (engram_eval.steer.injection): what it does, and what it needs."""
        return INJECTIONS[self.injection]

    def prefix_length(self, chunks: list[int] | tuple[int, ...]) -> int:
        """Positions the engram adds before the prompt: the largest k, for a mode that prepends it; else none."""
        return max(chunks) if self.mode.prefix_positions else 0

    def check(self) -> Method:
        mode = self.mode
        if mode.steers_vector != (self.vector is not None):
            raise EngramEvalError(f"--injection {self.injection}: steers with a vector (--vector NAME)" if mode.steers_vector
                                  else f"--vector: steers with vector-add or vector-clamp injection, not --injection {self.injection}")
        if self.scaling not in SCALINGS + VECTOR_SCALINGS:
            raise EngramEvalError(f"--scaling: unknown '{self.scaling}' (one of: {', '.join(SCALINGS)})")
        if self.scaling not in mode.scalings:
            raise EngramEvalError(mode.scaling_refusal)
        SCORINGS.check(self.scoring)
        if self.context not in CONTEXTS:
            raise EngramEvalError(f"--context: unknown '{self.context}' (one of: {', '.join(CONTEXTS)})")
        if self.positions not in POSITIONS:
            raise EngramEvalError(f"--positions: unknown '{self.positions}' (one of: {', '.join(POSITIONS)})")
        if self.positions != "all" and not mode.scopes_positions:
            raise EngramEvalError(f"--positions {self.positions}: applies to actadd injection; {self.injection} steers "
                                  "positions of its own (the prefix, or the first k prompt tokens)")
        if self.prefix_at not in PREFIX_PLACES:
            raise EngramEvalError(f"--prefix-at: unknown '{self.prefix_at}' (one of: {', '.join(PREFIX_PLACES)})")
        if self.prefix_at != PREFIX_PLACES[0] and mode.scopes_positions:
            raise EngramEvalError(f"--prefix-at {self.prefix_at}: applies to prefix and add injection; {self.injection} "
                                  "steers the residual stream at the positions --positions names")
        return self


SEED_METHOD = Method()


@dataclass(frozen=True)
class SweepSpec:
    """Everything a sweep computes: with a model and a bank, it determines every number of the run."""

    grid: Grid = Grid()
    method: Method = SEED_METHOD
    extraction: Extraction = SEED_EXTRACTION
    questions: tuple[str, ...] | None = None  # only these question ids (None: the whole bank)

    @classmethod
    def build(cls, *, layers: list[int] | tuple[int, ...] = DEFAULT_LAYERS,
              strengths: list[float] | tuple[float, ...] = DEFAULT_STRENGTHS,
              chunks: int | list[int] | tuple[int, ...] = DEFAULT_CHUNKS, questions: list[str] | None = None,
              extraction: Extraction = SEED_EXTRACTION, samples: int = 0, sample_seed: int = 0,
              **method: object) -> SweepSpec:
        """The flat form (the keywords of the command line's options): sweep's layers, strengths, chunks, samples,
        questions, extraction and the Method's fields."""
        chunk_tuple = (chunks,) if isinstance(chunks, int) else tuple(chunks)
        return cls(Grid(tuple(layers), tuple(strengths), chunk_tuple, samples, sample_seed), Method(**method), extraction,  # type: ignore[arg-type]
                   None if questions is None else tuple(questions))

    def check(self, num_layers: int | None = None) -> SweepSpec:
        self.grid.check(num_layers)
        self.method.check()
        if self.extraction.learns and not self.method.mode.takes_learned:
            raise EngramEvalError(f"--pooling {LEARNED_POOLING}: learned vectors live in the input-embedding space, and "
                                  f"--injection {self.method.injection} adds a residual-stream direction at layer L; use "
                                  "prefix or add injection")
        negative = [s for s in self.grid.strengths if s < 0]
        if negative and not self.method.mode.signed_strengths:
            raise EngramEvalError(f"--strengths: {negative[0]:g} is negative; a negative strength subtracts the engram, which "
                                  f"applies to add and actadd injection, not {self.method.injection} (its vectors are "
                                  "positions of their own)")
        self.extraction.check(list(self.grid.chunks))
        if self.method.reextract and (self.extraction.learns or self.extraction.window is not None):
            raise EngramEvalError("--reextract: reads the source after each prompt in one pass; it does not combine with "
                                  f"{'--pooling learned' if self.extraction.learns else '--window'}")
        return self

    def with_layers(self, layers: list[int]) -> SweepSpec:
        return replace(self, grid=replace(self.grid, layers=tuple(layers)))


@dataclass(frozen=True)
class Ensembling:
    """How many engrams a step averages over, how fast older ones fade, and whether each step re-extracts."""

    size: int = 1
    decay: float = DEFAULT_ENSEMBLE_DECAY
    reextract: bool = False

    def check(self) -> Ensembling:
        if isinstance(self.size, bool) or self.size < 1:
            raise EngramEvalError(f"--ensemble: must be at least 1 (got {self.size})")
        if not (math.isfinite(self.decay) and self.decay >= 0):
            raise EngramEvalError(f"--ensemble-decay: must be finite and at least 0 (got {self.decay:g})")
        return self

    @property
    def plain(self) -> bool:
        """Today's generation: one engram, injected once, decoded with the KV cache."""
        return self.size == 1 and not self.reextract


@dataclass(frozen=True)
class RayOptions:
    address: str = "auto"  # auto: a running cluster, else a local one; or a cluster's address
    workers: int | None = None  # None: as many as the cluster's CPUs (or GPUs) allow
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1

    def check(self) -> RayOptions:
        if self.workers is not None and self.workers < 1:
            raise EngramEvalError(f"--workers: must be at least 1 (got {self.workers})")
        if self.gpus_per_worker < 0:
            raise EngramEvalError(f"--gpus-per-worker: must be at least 0 (got {self.gpus_per_worker:g})")
        if self.threads_per_worker < 1:
            raise EngramEvalError(f"--threads-per-worker: must be at least 1 (got {self.threads_per_worker})")
        return self


@dataclass(frozen=True)
class Execution:
    """How a run executes; no setting here changes a number (none is part of the run's identity)."""

    batch_size: int | None = None  # cells per forward pass; None: the largest that fits
    ray: RayOptions | None = None  # None: this process alone
    threads: int | None = None  # CPU threads of this process's torch while it runs; None: as torch has them

    def check(self) -> Execution:
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or self.batch_size < 1):
            raise EngramEvalError(f"--batch-size: '{self.batch_size}' is not 'auto' or a whole number >= 1")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise EngramEvalError(f"--threads: must be at least 1 (got {self.threads})")
        if self.ray is not None:
            self.ray.check()
        return self


def _warn(message: str) -> None:
    warnings.warn(message, EngramEvalWarning, stacklevel=4)


@dataclass(frozen=True)
class Observer:
    """What a run tells its caller while it runs. warn receives what a researcher must read before trusting the
    numbers (by default Python's warnings machinery, one line each); before_question runs before each question is
    computed, outside the sweep's timings (the benchmark measures the machine there)."""

    progress: bool = True
    log: Callable[[str], None] = field(default=lambda message: None)
    warn: Callable[[str], None] = field(default=_warn)
    before_question: Callable[[object], None] = field(default=lambda question: None)


QUIET = Observer(progress=False, warn=lambda message: None)
