"""Several runs side by side (one bank on several models, say), their layers on a shared relative-depth axis."""

from __future__ import annotations

import json

import polars as pl

from ..core.errors import EngramEvalError
from ..run.results import primary_rows
from .statistics import rate
from .sink import load_answers
from .summary import per_condition, summarize


def summarize_runs(runs: list[tuple[str, pl.DataFrame, dict]], allow_different_banks: bool = False) -> dict:
    """Several runs side by side (e.g. one bank on several models): per run its model, its layers as relative depth
    (layer / number of layers, so a 30-layer and a 28-layer model line up), baseline accuracy, question flip and
    fragile-correct rates, control verdicts, the relevant engram's heatmaps by depth, and its chunk-count table."""
    banks = {run.get("settings", {}).get("bank_sha256") for _, _, run in runs}
    if len(banks) > 1 and not allow_different_banks:
        described = ", ".join(f"{path} ({run.get('settings', {}).get('bank', '?')} {str(run.get('settings', {}).get('bank_sha256'))[:8]})"
                              for path, _, run in runs)
        raise EngramEvalError(f"report: the runs use different banks ({described}); pass --allow-different-banks to put them side by side")
    differing = _differing_settings([run.get("settings", {}) for _, _, run in runs])
    columns = []
    for path, frame, run in runs:
        frame = frame.filter(primary_rows())  # other paraphrases and samples: each run's own variability section
        if "num_layers" not in run:
            raise EngramEvalError(f"{path}: run.json has no num_layers (swept with an older engram-eval); sweep it again to compare it")
        summary = summarize(frame, run, answers=load_answers(path, run))
        base = per_condition(frame).filter(pl.col("role") == "baseline")
        depth = {layer: layer / run["num_layers"] for layer in summary["header"]["layers"]}
        columns.append({
            "run": str(path),
            "model": summary["header"]["model"],
            "bank": summary["header"]["bank"],
            "layers": summary["header"]["layers"],
            "depths": [round(depth[layer], 3) for layer in summary["header"]["layers"]],
            "baseline_accuracy": rate(int(base["correct_before"].sum()), base.height),
            "question_flip_rate": summary["headline"]["question_flip_rate"],
            "question_fragile_correct_rate": summary["headline"]["question_fragile_correct_rate"],
            "controls": {c["kind"]: {"verdict": c["verdict"], "p_value": c["p_value"], "mean_difference": c["mean_difference"]}
                         for c in summary["controls"]},
            "heatmaps": {name: {**heatmap, "depths": [round(depth[layer], 3) for layer in heatmap["layers"]]}
                         for name, heatmap in summary["heatmaps"].items()},
            "chunk_count": summary["chunk_count"],
            "sink": None if summary["sink"] is None else {k["kind"]: k["sink"] for k in summary["sink"]["by_kind"]},
            "differs": {name: _short(run.get("settings", {}).get(name)) for name in differing},
        })
    return {"runs": columns, "differing_settings": differing}


UNCOMPARED = ("model_fingerprint", "bank_sha256")  # identities: the model and bank names say the same, readably


def _differing_settings(settings: list[dict]) -> list[str]:
    """The settings (run.json's `settings`) whose values are not the same in every run, in name order."""
    names = sorted(set().union(*settings) - set(UNCOMPARED))
    return [name for name in names if len({json.dumps(s.get(name), sort_keys=True, default=str) for s in settings}) > 1]


def _short(value: object) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) if len(value) <= 8 else f"{len(value)} values"
    return str(value)
