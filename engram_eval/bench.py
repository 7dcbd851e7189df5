"""Benchmark: engram-eval's build and sweep against the seed's per-cell loop and the machine's matmul peak, in one run."""

from __future__ import annotations

import math
import os
import resource
import threading
import tempfile
import time
from pathlib import Path

import torch

from .bank import Bank
from .engram import chunk_mean
from .model import LoadedModel
from .store import EngramStore
from .sweep import prepare_question, run_sweep, scale_engram


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, trials: int = 7, seconds: float = 0.5) -> float:
    """Dense square matmul throughput (FLOP/s), measured now on this machine: the best of several trials, so a
    moment of contention from other processes does not lower the reference."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        _sync(device)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            runs += 1
        _sync(device)
        best = max(best, 2 * n**3 * runs / (time.perf_counter() - started))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cell_flops(lm: LoadedModel, seq_len: int, scored_positions: int = 1) -> float:
    """2 x non-embedding parameters x sequence length + 2 x hidden x vocabulary per scored position."""
    config = lm.model.config
    embedding = config.vocab_size * config.hidden_size
    non_embedding = sum(p.numel() for p in lm.model.parameters()) - embedding * (1 if config.tie_word_embeddings else 2)
    return 2 * non_embedding * seq_len + 2 * config.hidden_size * config.vocab_size * scored_positions


@torch.inference_mode()
def seed_loop(lm: LoadedModel, bank: Bank, layers: list[int], strengths: list[float], chunks: int, max_cells: int) -> tuple[int, float]:
    """The seed scripts' way: extraction re-run for every layer, one forward pass per cell, logits at every position.

    Times the first max_cells / questions cells of every question (in grid order), so the sample has the same mix
    of prompt lengths as the sweep.
    """
    embed = lm.model.get_input_embeddings()
    per_question = math.ceil(max_cells / len(bank.questions))
    cells_done, started = 0, time.perf_counter()
    for question in bank.questions:
        prepared = prepare_question(lm, question, "first-token", bank.path)
        prompt = embed(torch.tensor(prepared.prompt_ids, device=lm.device))
        grid = [(name, layer) for name in (question.engram, *question.controls) for layer in layers]
        done_here = 0
        for name, layer in grid:
            source_ids = torch.tensor([lm.tokenizer(bank.sources[name].text)["input_ids"]], device=lm.device)
            hidden = lm.model(input_ids=source_ids, output_hidden_states=True).hidden_states[layer][0].float()
            engram = chunk_mean(hidden, chunks)
            for strength in strengths:
                prefix = scale_engram(engram, lm.embedding_norm, strength).to(lm.dtype)
                logits = lm.model(inputs_embeds=torch.cat([prefix, prompt]).unsqueeze(0)).logits
                probs = torch.softmax(logits[0, -1].float(), dim=-1)
                [probs[ids[0]].item() for ids in prepared.correct_ids + prepared.incorrect_ids]
                cells_done += 1
                done_here += 1
                if done_here >= per_question:
                    break
            if done_here >= per_question:
                break
    return cells_done, time.perf_counter() - started


def run_bench(lm: LoadedModel, bank: Bank, layers: list[int], strengths: list[float], chunks: int = 16,
              loop_cells: int = 120, batch_size: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = EngramStore(Path(tmp) / "store")
        sources = list(dict.fromkeys(n for q in bank.questions for n in (q.engram, *q.controls)))
        started = time.perf_counter()
        for name in sources:
            store.ensure(lm, name, bank.sources[name].text, layers, chunks)
        build_seconds = time.perf_counter() - started
        started = time.perf_counter()
        with torch.inference_mode():
            for name in sources:
                ids = torch.tensor([lm.tokenizer(bank.sources[name].text)["input_ids"]], device=lm.device)
                for layer in layers:  # seed: one pass per layer
                    chunk_mean(lm.model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0].float(), chunks)
        seed_build_seconds = time.perf_counter() - started

        with RssSampler() as rss:
            result = run_sweep(lm, bank, store, Path(tmp) / "run", layers=layers, strengths=strengths, chunks=chunks,
                               batch_size=batch_size, progress=False)
        sweep_seconds = result.run["timings"]["sweep_seconds"]
        total_cells = result.run["cells"]["total"]
        flops = 0.0
        for question in bank.questions:
            prompt_len = len(prepare_question(lm, question, "first-token", bank.path).prompt_ids)
            n_cells = (1 + len(question.controls)) * len(layers) * len(strengths)
            flops += cell_flops(lm, prompt_len) + n_cells * cell_flops(lm, chunks + prompt_len)
    loop_done, loop_seconds = seed_loop(lm, bank, layers, strengths, chunks, loop_cells)
    peak = matmul_flops(lm.device, lm.dtype)
    sweep_rate = total_cells / sweep_seconds
    loop_rate = loop_done / loop_seconds
    return {
        "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "sources": len(sources), "layers": len(layers),
        "build_seconds": build_seconds, "seed_build_seconds": seed_build_seconds, "build_speedup": seed_build_seconds / build_seconds,
        "cells": total_cells, "sweep_cells_per_second": sweep_rate, "loop_cells": loop_done, "loop_cells_per_second": loop_rate,
        "sweep_speedup": sweep_rate / loop_rate,
        "achieved_flops": flops / sweep_seconds, "matmul_flops": peak, "roofline_fraction": flops / sweep_seconds / peak,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sweep_rss_quarter_mib": rss.at(0.25), "sweep_rss_end_mib": rss.at(1.0),
    }


class RssSampler:
    """Samples this process's resident memory every 0.1 s while a block runs (is memory flat as cells grow?)."""

    def __enter__(self) -> "RssSampler":
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

