"""Check: a run's results against a committed baseline summary -> what moved, and by how much."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import EngramEvalError
from ..core.files import atomic_write_text

if TYPE_CHECKING:
    import polars as pl

# Measured on the CI bank (docs/check.md): the same float32 CPU sweep run twice, and at batch sizes 1, 7 and
# auto, gave bit-identical log ratios; the defaults leave headroom for other CPUs' matmul kernels.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4


def summarize_run(frame: pl.DataFrame, run: dict) -> dict:
    """The baseline file's content: the run's settings; per question its baseline log ratio; per cell log ratio,
    flipped, broken; totals."""
    import polars as pl  # here: the check command's options (its tolerances) load without polars

    from .summary import per_condition

    frame = per_condition(frame)  # no order needed: the file is keyed by cell and written with sorted keys
    base = frame.filter(pl.col("role") == "baseline")
    cells = frame.filter(pl.col("role") != "baseline")
    k_axis = cells["chunks"].n_unique() > 1  # a chunk-count grid: k is part of a cell's name (seed runs keep theirs)
    variant = (pl.when(pl.col("sample").is_not_null()).then(pl.format("|sample{}", "sample"))  # another paraphrase, a sample:
               .when(pl.col("paraphrase") > 0).then(pl.format("|p{}", "paraphrase")).otherwise(pl.lit("")))  # their own cells
    cells = cells.with_columns(
        key=pl.format("{}|{}|L{}|s{}", "question_id", "engram", "layer", "strength")
        + (pl.format("|k{}", "chunks") if k_axis else pl.lit("")) + variant
    )
    return {
        "settings": run.get("settings", {}),
        "model_fingerprint": frame["model_fingerprint"][0],
        "questions": {r["question_id"]: {"baseline_log_ratio": r["log_ratio"]} for r in base.iter_rows(named=True)},
        "cells": {r["key"]: {"log_ratio": r["log_ratio"], "flipped": r["flipped"], "broken": r["broken"]}
                  for r in cells.select("key", "log_ratio", "flipped", "broken").iter_rows(named=True)},
        "totals": {"questions": base.height, "cells": cells.height,
                   "flips": int(cells["flipped"].sum()), "breaks": int(cells["broken"].sum())},
    }


@dataclass(frozen=True)
class Drift:
    what: str
    baseline: object
    current: object
    difference: float | None = None


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    if math.isinf(a) or math.isinf(b) or math.isnan(a) or math.isnan(b):
        return a == b or (math.isnan(a) and math.isnan(b))
    return abs(a - b) <= atol + rtol * abs(b)


def differing_settings(current: dict, baseline: dict) -> list[str]:
    """Settings in which a run differs from the baseline's run, each as 'name (baseline X, run Y)'. A setting the
    baseline predates must have its default value (the seed method) in the run."""
    from ..run.settings import defaults as setting_defaults

    defaults = setting_defaults()
    before, now = baseline.get("settings"), current.get("settings", {})
    if not before:
        return ["none recorded in the baseline (written by an older engram-eval; regenerate it with --update from a run you trust)"]
    differing = []
    for name in sorted(set(before) | set(now)):
        old = before.get(name, defaults.get(name, "(absent)"))
        new = now.get(name, defaults.get(name, "(absent)"))
        if old != new:
            differing.append(f"{name} (baseline {_short(old)}, run {_short(new)})")
    return differing


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def compare(current: dict, baseline: dict, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> list[Drift]:
    drifts: list[Drift] = []
    for section, numeric in (("questions", ("baseline_log_ratio",)), ("cells", ("log_ratio",))):
        old, new = baseline.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if key not in new:
                drifts.append(Drift(f"{section[:-1]} {key}", "present", "missing"))
                continue
            if key not in old:
                drifts.append(Drift(f"{section[:-1]} {key}", "missing", "present"))
                continue
            for field, value in old[key].items():
                now = new[key].get(field)
                if field in numeric:
                    if now is None or not _close(now, value, rtol, atol):
                        drifts.append(Drift(f"{key} {field}", value, now, None if now is None else now - value))
                elif now != value:
                    drifts.append(Drift(f"{key} {field}", value, now))
    for field, value in baseline.get("totals", {}).items():
        if current["totals"].get(field) != value:
            drifts.append(Drift(f"totals {field}", value, current["totals"].get(field)))
    return drifts


def read_baseline(path: Path) -> dict:
    try:
        baseline = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngramEvalError(f"--baseline {path}: not found (create it with --update)") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise EngramEvalError(f"--baseline {path}: not a readable baseline summary ({' '.join(str(exc).split())})") from None
    if (problem := baseline_problem(baseline)) is not None:
        raise EngramEvalError(f"--baseline {path}: not a baseline summary ({problem}); write one with --update from a run you trust")
    return baseline


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def baseline_problem(baseline: object) -> str | None:
    """What makes a file not a whole baseline summary (the shape summarize_run writes), or None. An empty or partial
    baseline would pass every run, so it is an error too."""
    if not isinstance(baseline, dict):
        return f"a JSON {type(baseline).__name__}, not an object"
    for section in ("settings", "questions", "cells", "totals"):
        if not isinstance(baseline.get(section), dict):
            return f"no '{section}' object"
    if not baseline["questions"]:
        return "no questions"
    for key, entry in baseline["questions"].items():
        if not isinstance(entry, dict) or not _is_number(entry.get("baseline_log_ratio")):
            return f"question '{key}' has no numeric baseline_log_ratio"
    for key, entry in baseline["cells"].items():
        if not isinstance(entry, dict) or "log_ratio" not in entry or not (_is_number(entry["log_ratio"]) or entry["log_ratio"] is None):
            return f"cell '{key}' has no numeric log_ratio"
        if any(not isinstance(entry.get(flag), bool) for flag in ("flipped", "broken")):
            return f"cell '{key}' lacks its flipped and broken flags"
    totals = baseline["totals"]
    for field in ("questions", "cells", "flips", "breaks"):
        if not _is_number(totals.get(field)):
            return f"totals lack '{field}'"
    for field, count in (("questions", len(baseline["questions"])), ("cells", len(baseline["cells"]))):
        if totals[field] != count:
            return f"totals say {totals[field]} {field}, the file holds {count}: a partial baseline"
    return None


def write_baseline(path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(summary, indent=1, sort_keys=True) + "\n")
