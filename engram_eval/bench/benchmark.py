"""Benchmark: engram-eval's build and sweep against the seed's per-cell loop and the machine's matmul peak, in one run."""

from __future__ import annotations

import itertools
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Self

import polars as pl
import torch

from ..backend.model import LoadedModel
from ..bank.banks import Bank, Question
from ..core.registry import INJECTIONS, NULL_PREFIXES
from ..core.spec import LEARNED_POOLING, QUIET, SEED_METHOD, Ensembling, Execution, Extraction, RayOptions, SweepSpec
from ..engram.nulls import null_prefix
from ..engram.pooling import chunk_mean
from ..engram.store import EngramStore
from ..run.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    question_rows,
    reopen_run,
    run_generate,
    select_cells,
)
from ..run.rundir import read_run_json
from ..run.settings import SweepSettings
from ..run.sweep import SweepResult, run_sweep
from ..steer.ensemble import ensembled_tokens
from ..steer.injection import Steering
from ..steer.prompts import prepare_question
from ..bank.passages import DEFAULT as NEUTRAL_DEFAULT, read_passage


class MatmulProbe:
    """Dense square matmul throughput (FLOP/s) of this machine, measured on demand (n = 2048 on CPU; 8192 on GPU,
    where smaller products do not fill the device)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, n: int | None = None):
        self.device, self.n = device, n or (8192 if device.type == "cuda" else 2048)
        self.a = torch.randn(self.n, self.n, device=device, dtype=dtype)
        self.b = torch.randn(self.n, self.n, device=device, dtype=dtype)
        for _ in range(3):
            self.a @ self.b

    def rate(self, seconds: float = 0.5) -> float:
        _sync(self.device)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            self.a @ self.b
            runs += 1
        _sync(self.device)
        return 2 * self.n**3 * runs / (time.perf_counter() - started)

    def best(self, trials: int = 7, seconds: float = 0.5) -> float:
        """The best of several trials: the machine's throughput with the least contention from other processes."""
        return max(self.rate(seconds) for _ in range(trials))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cell_flops(lm: LoadedModel, seq_len: int, scored_positions: int = 1) -> float:
    """2 x non-embedding parameters x sequence length + 2 x hidden x vocabulary per scored position."""
    per_token, head = lm.backend.flops_per_token()
    return per_token * seq_len + head * scored_positions


@torch.inference_mode()
def seed_extract(lm: LoadedModel, text: str, layer: int, chunks: int) -> torch.Tensor:
    """The seed scripts' extraction: tokenize and run the source for one layer."""
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]], device=lm.device)
    return chunk_mean(lm.backend.hidden_states(ids)[layer][0].float(), chunks)


@torch.inference_mode()
def seed_loop(lm: LoadedModel, bank: Bank, question: Question, layers: list[int], strengths: list[float], chunks: int,
              max_cells: int, injection: str = SEED_METHOD.injection) -> tuple[int, float]:
    """The seed scripts' way, on a question's first max_cells cells in grid order: extraction re-run for every layer,
    one forward pass per cell (with the cell's injection), logits at every position -> (cells, seconds)."""
    started = time.perf_counter()
    embed = lm.backend.embed
    prepared = prepare_question(lm, question, SEED_METHOD.scoring, bank.path)
    prompt = embed(torch.tensor(prepared.prompt_ids, device=lm.device)).unsqueeze(0)
    mode = INJECTIONS[injection]
    norms = mode.residual_norms(lm, prepared.prompt_ids, layers)
    cells = 0
    for name in (question.engram, *question.controls):
        for layer in layers:
            engram = null_prefix(name, lm, chunks) if name in NULL_PREFIXES else bank.expression(name).combine(  # a source, or an expression
                lambda source: seed_extract(lm, bank.sources[source].text, layer, chunks))
            unit = mode.unit(lm, engram, "global")
            for strength in strengths:
                steering = Steering(injection, mode.scaled(unit, strength, norms.get(layer), "global").unsqueeze(0).to(lm.device), [layer])
                with steering.active(lm.backend):
                    logits = lm.backend.full_logits(steering.inputs(prompt))
                probs = torch.softmax(logits[0, -1].float(), dim=-1)
                [probs[ids[0]].item() for ids in prepared.correct_ids + prepared.incorrect_ids]
                cells += 1
                if cells == max_cells:
                    return cells, time.perf_counter() - started
    return cells, time.perf_counter() - started


def run_bench(lm: LoadedModel, bank: Bank, layers: list[int], strengths: list[float], chunks: int = 16,
              loop_cells: int = 120, batch_size: int | None = None, probe_seconds: float = 0.3, injection: str = SEED_METHOD.injection,
              generation_cells: int = 12, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, ray: RayOptions | None = None) -> dict:
    """Build and sweep with engram-eval; before each question of the sweep (outside its timings), run the seed loop
    on a sample of that question's cells and a matmul probe, so all three are measured under the same contention
    from whatever else shares the machine."""
    probe = MatmulProbe(lm.device, lm.dtype)
    loop_per_question = math.ceil(loop_cells / len(bank.questions))
    with tempfile.TemporaryDirectory() as tmp:
        store = EngramStore(Path(tmp) / "store")
        sources = bank.source_names([n for q in bank.questions for n in (q.engram, *q.controls)])
        started = time.perf_counter()
        for name in sources:
            store.ensure(lm, name, bank.sources[name].text, layers, chunks)
        build_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for name in sources:
            for layer in layers:
                seed_extract(lm, bank.sources[name].text, layer, chunks)
        seed_build_seconds = time.perf_counter() - started

        loop_done, loop_seconds, matmul_rates, pauses = 0, 0.0, [], []  # pauses: (paused at, resumed at)

        def measure_machine(question: Question) -> None:
            nonlocal loop_done, loop_seconds
            paused = time.perf_counter()
            done, seconds = seed_loop(lm, bank, question, layers, strengths, chunks, loop_per_question, injection)
            loop_done, loop_seconds = loop_done + done, loop_seconds + seconds
            matmul_rates.append(probe.rate(probe_seconds))
            pauses.append((paused, time.perf_counter()))

        with RssSampler() as rss:
            spec = SweepSpec.build(layers=layers, strengths=strengths, chunks=chunks, injection=injection)
            result = run_sweep(lm, bank, store, Path(tmp) / "run", spec, execution=Execution(batch_size=batch_size),
                               observer=replace(QUIET, before_question=measure_machine))
        finished = time.perf_counter()
        matmul_rates.append(probe.rate(probe_seconds))
        side_effects = bench_side_effects(lm, bank, store, result, spec, batch_size)
        learned = bench_learned(lm, bank.sources[sources[0]].text, layers[0], chunks)
        generation = bench_generation(lm, result.out, generation_cells, max_new_tokens) if generation_cells else {}
        attention = bench_attention(lm, bank, store, Path(tmp), layers, strengths, chunks, injection)
        startup = bench_startup(result.out)
        distributed = bench_ray(lm, bank, store, Path(tmp), layers, strengths, chunks, injection, ray) if ray else {}
    # Question i ran between the end of pause i and the start of pause i + 1 (the last one until the sweep returned),
    # next to the matmul probes just before and just after it.
    ends = [paused for paused, _ in pauses[1:]] + [finished]
    segments = [end - resumed for (_, resumed), end in zip(pauses, ends)]
    matmul_during = [(before + after) / 2 for before, after in itertools.pairwise(matmul_rates)]
    flops = [question_flops(lm, bank, question, layers, strengths, chunks, injection) for question in bank.questions]
    sweep_seconds = sum(segments)
    best = max(probe.best(), *matmul_rates)
    achieved = sum(flops) / sweep_seconds
    matmul_same_time = sum(s * r for s, r in zip(segments, matmul_during)) / sweep_seconds
    sweep_rate = result.run["cells"]["total"] / sweep_seconds
    loop_rate = loop_done / loop_seconds
    return {
        "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "injection": injection,
        "sources": len(sources), "layers": len(layers),
        "build_seconds": build_seconds, "seed_build_seconds": seed_build_seconds, "build_speedup": seed_build_seconds / build_seconds,
        "cells": result.run["cells"]["total"], "sweep_cells_per_second": sweep_rate,
        "loop_cells": loop_done, "loop_cells_per_second": loop_rate, "sweep_speedup": sweep_rate / loop_rate,
        "achieved_flops": achieved, "matmul_flops": matmul_same_time, "roofline_fraction": achieved / matmul_same_time,
        "matmul_flops_best": best, "roofline_fraction_of_best": achieved / best,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sweep_rss_quarter_mib": rss.at(0.25), "sweep_rss_end_mib": rss.at(1.0),
        **side_effects,
        **learned,
        **generation,
        **attention,
        **startup,
        **distributed,
    }


def alternated_sweeps(lm: LoadedModel, bank: Bank, store: EngramStore, folder: Path,
                      variants: dict[str, tuple[SweepSpec, Execution]], questions: int) -> dict[str, list[SweepResult]]:
    """The first questions swept once per variant, twice, in the order A B then B A, in one run: every variant meets the
    same contention -> each variant's two results."""
    ids = tuple(q.id for q in bank.questions[:questions])
    names = list(variants)
    results: dict[str, list[SweepResult]] = {name: [] for name in names}
    for trial in range(2):
        for name in names if trial == 0 else names[::-1]:
            spec, execution = variants[name]
            results[name].append(run_sweep(lm, bank, store, folder / f"{name}-{trial}", replace(spec, questions=ids),
                                           execution=execution, observer=QUIET))
    return results


def _seconds(results: list[SweepResult]) -> float:
    return sum(result.run["timings"]["sweep_seconds"] for result in results)


def bench_ray(lm: LoadedModel, bank: Bank, store: EngramStore, folder: Path, layers: list[int], strengths: list[float],
              chunks: int, injection: str, ray: RayOptions, questions: int = 4) -> dict:
    """Ray's overhead: the first questions swept by this process (its threads) and by the Ray workers, alternated; the
    workers' start and model loading are outside the timed sweep, like this process's own."""
    spec = SweepSpec.build(layers=layers, strengths=strengths, chunks=chunks, injection=injection)
    runs = alternated_sweeps(lm, bank, store, folder, {"process": (spec, Execution()), "ray": (spec, Execution(ray=ray))},
                             questions)
    rate = {kind: sum(r.run["cells"]["total"] for r in results) / _seconds(results) for kind, results in runs.items()}
    return {"ray_workers": runs["ray"][0].run["distributed"]["workers"], "ray_threads_per_worker": ray.threads_per_worker,
            "process_threads": torch.get_num_threads(), "process_cells_per_second": rate["process"],
            "ray_cells_per_second": rate["ray"], "ray_throughput_ratio": rate["ray"] / rate["process"]}


def bench_side_effects(lm: LoadedModel, bank: Bank, store: EngramStore, swept: SweepResult, spec: SweepSpec,
                       batch_size: int | None) -> dict:
    """What `--neutral default` adds to a sweep: the bench's finished run resumed with the probe (every question is
    done, so only the probe runs) -> its seconds as a fraction of the sweep's."""
    probed = run_sweep(lm, bank, store, swept.out, spec, execution=Execution(batch_size=batch_size),
                       neutral=read_passage(NEUTRAL_DEFAULT), observer=QUIET)
    seconds = probed.run["timings"]["side_effects_seconds"]
    sweep_seconds = swept.run["timings"]["sweep_seconds"]
    return {"side_effect_cells": probed.run["side_effects"]["cells"]["total"], "side_effects_seconds": seconds,
            "sweep_seconds": sweep_seconds, "side_effects_cost": seconds / sweep_seconds}


LEARN_BENCH_STEPS = 8


def bench_learned(lm: LoadedModel, text: str, layer: int, chunks: int) -> dict:
    """--pooling learned on one source at one layer: seconds per optimisation step (forward and backward of the
    reconstruction objective, the update and the projection), that step over one forward pass of the objective alone,
    and what the default 200 steps would take per source, layer and k."""
    from ..engram.extraction import extract_engram, tokenize_source
    from ..engram.learned import learn_vectors, objective_for

    extraction = Extraction(pooling=LEARNED_POOLING, learn_steps=LEARN_BENCH_STEPS, learn_lr=1.0)  # no plateau this soon
    objective = objective_for(lm, tokenize_source(lm, text, extraction.max_tokens)[0], extraction)
    initial = extract_engram(lm, text, [layer], chunks).layers[layer]
    started = time.perf_counter()
    learned = learn_vectors(lm, initial, objective, extraction)
    seconds = time.perf_counter() - started
    with torch.inference_mode():
        objective(learned.vectors.to(lm.device))  # warm-up
        forward_started = time.perf_counter()
        for _ in range(3):
            objective(learned.vectors.to(lm.device))
        forward = (time.perf_counter() - forward_started) / 3
    steps = learned.steps
    per_step = max(seconds - 2 * forward, 0.0) / steps  # learning also evaluates the objective before and after
    return {"learned_steps": steps, "learned_seconds_per_step": per_step, "learned_forward_seconds": forward,
            "learned_step_over_forward": per_step / forward,
            "learned_default_seconds": Extraction().learn_steps * per_step}


def bench_startup(run_dir: Path, trials: int = 5) -> dict:
    """Wall time of a fresh interpreter: doing nothing (`python -c pass`), `engram-eval --help`, and `engram-eval report`
    of the bench's own run (neither loads torch) -> medians over trials, and each as a ratio to doing nothing."""
    def seconds(*args: str) -> float:
        times = []
        for _ in range(trials):
            started = time.perf_counter()
            subprocess.run([sys.executable, *args], check=True, capture_output=True)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    python = seconds("-c", "pass")
    help_ = seconds("-m", "engram_eval.cli", "--help")
    report = seconds("-m", "engram_eval.cli", "report", str(run_dir), "--format", "json", "--output", str(run_dir / "bench-report.json"))
    return {"startup_python_seconds": python, "startup_help_seconds": help_, "startup_report_seconds": report,
            "startup_help_ratio": help_ / python, "startup_report_ratio": report / python}


def bench_attention(lm: LoadedModel, bank: Bank, store: EngramStore, folder: Path, layers: list[int], strengths: list[float],
                    chunks: int, injection: str, questions: int = 2) -> dict:
    """What --record-attention costs: the first questions swept with it and without it, alternated, in one run."""
    without = SweepSpec.build(layers=layers, strengths=strengths, chunks=chunks, injection=injection)
    with_attention = replace(without, method=replace(without.method, record_attention=True))
    runs = alternated_sweeps(lm, bank, store, folder, {"without": (without, Execution()), "with": (with_attention, Execution())},
                             questions)
    return {"attention_cost": _seconds(runs["with"]) / _seconds(runs["without"])}


@torch.inference_mode()
def bench_generation(lm: LoadedModel, run_dir: Path, reference_cells: int, max_new_tokens: int) -> dict:
    """The batched generator on the run's default selection, then transformers' own `generate`, one call per cell, on an
    evenly spread sample of the same cells -> tokens/s of each and their ratio."""
    result = run_generate(lm, run_dir, max_new_tokens=max_new_tokens, progress=False)
    run = read_run_json(run_dir)
    settings, bank, raw = reopen_run(lm, run_dir, run)
    selected = select_cells(pl.read_parquet(run_dir / "results.parquet"), "default").drop("row")
    step = max(1, selected.height // reference_cells)
    sample = selected.gather(list(range(0, selected.height, step))[:reference_cells])
    tokens, started = 0, time.perf_counter()
    embed = lm.backend.embed
    for question in bank.questions:
        rows = sample.filter(pl.col("question_id") == question.id)
        if rows.is_empty():
            continue
        for row in question_rows(lm, question, bank, rows, raw, settings)[1]:
            body = embed(torch.tensor([row.prompt_ids], device=lm.device))
            with row.steering.active(lm.backend) if row.steering is not None else nullcontext():
                inputs = body if row.steering is None else row.steering.inputs(body)
                tokens += len(lm.backend.generate(inputs, max_new_tokens))
    reference_rate = tokens / (time.perf_counter() - started)
    batched_rate = result.info["timings"]["tokens_per_second"]
    ensembled = bench_ensemble(lm, bank, settings, raw, selected.filter(pl.col("role") != "baseline"), batched_rate)
    return {"generation_cells": result.info["generations"], "generation_tokens_per_second": batched_rate,
            "generation_reference_cells": sample.height, "generation_reference_tokens_per_second": reference_rate,
            "generation_speedup": batched_rate / reference_rate, **ensembled}


ENSEMBLE_BENCH = Ensembling(size=3, reextract=True)  # what bench times: ACT's ensemble over per-step re-extractions
ENSEMBLE_BENCH_CELLS, ENSEMBLE_BENCH_TOKENS = 2, 8


def bench_ensemble(lm: LoadedModel, bank: Bank, settings: SweepSettings, raw: dict, cells: pl.DataFrame,
                   plain_tokens_per_second: float) -> dict:
    """`generate --ensemble 3 --reextract` on the first cells of the selection: seconds per generated token, and that
    cost over plain batched generation's (the same run's generate, just measured)."""
    tokens, seconds = 0, 0.0
    for row in cells.head(ENSEMBLE_BENCH_CELLS).iter_rows(named=True):
        question = next(q for q in bank.questions if q.id == row["question_id"])
        for todo in question_rows(lm, question, bank, pl.DataFrame([row], schema=cells.schema), raw, settings, ENSEMBLE_BENCH)[1]:
            started = time.perf_counter()
            tokens += len(ensembled_tokens(lm, todo.prompt_ids, todo.ensemble, ENSEMBLE_BENCH_TOKENS)[0]) or 1
            seconds += time.perf_counter() - started
    if not tokens:
        return {}
    per_token = seconds / tokens
    return {"ensemble_seconds_per_token": per_token, "ensemble_token_cost": per_token * plain_tokens_per_second}


def question_flops(lm: LoadedModel, bank: Bank, question: Question, layers: list[int], strengths: list[float], chunks: int,
                   injection: str = SEED_METHOD.injection) -> float:
    """The baseline pass plus one pass per computed cell, each with the prompt (and, for prefix injection, the engram's
    chunks) as its sequence. A null prefix is computed once per strength, not per layer, except with actadd."""
    prompt_len = len(prepare_question(lm, question, SEED_METHOD.scoring, bank.path).prompt_ids)
    nulls = sum(name in NULL_PREFIXES for name in question.controls)
    mode = INJECTIONS[injection]
    null_cells = nulls * len(strengths) * (len(layers) if mode.site_depends_on_layer else 1)
    n_cells = (1 + len(question.controls) - nulls) * len(layers) * len(strengths) + null_cells
    return cell_flops(lm, prompt_len) + n_cells * cell_flops(lm, (chunks if mode.prefix_positions else 0) + prompt_len)


class RssSampler:
    """Samples this process's resident memory every 0.1 s while a block runs (is memory flat as cells grow?)."""

    def __enter__(self) -> Self:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.1):
            with open("/proc/self/statm") as f:
                self.samples.append(int(f.read().split()[1]) * page / 2**20)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, fraction: float) -> float | None:
        """Highest RSS (MiB) seen up to this fraction of the block's duration."""
        count = max(1, int(len(self.samples) * fraction))
        return max(self.samples[:count]) if self.samples else None

