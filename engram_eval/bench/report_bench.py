"""What a report costs: `engram-eval report` of finished runs in fresh interpreters on one CPU thread, against reading
the same runs' Parquet in a fresh interpreter — wall time (interpreter start and imports included: what a user waits
for) and peak resident memory, medians over trials. No torch: this runs without a model."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..core.errors import EngramEvalError

ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "POLARS_MAX_THREADS",
                                     "RAYON_NUM_THREADS", "NUMEXPR_NUM_THREADS")}
REPORT_FORMATS = ("table", "json", "html")

# The child: run one command in this interpreter, then write its peak RSS (ru_maxrss: KiB on Linux) to a file.
CHILD = """
import json, resource, sys
out, action, *args = sys.argv[1:]
if action == "read":
    import polars as pl
    for path in args:
        pl.read_parquet(path)
else:
    from engram_eval.cli import cli
    cli(["report", *args], prog_name="engram-eval", standalone_mode=False)
with open(out, "w") as f:
    json.dump({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f)
"""


def measure(action: str, args: list[str], trials: int) -> dict:
    """Median wall seconds and peak MiB of `action` (read: the Parquet files args; report: `engram-eval report` with
    args) in fresh one-thread interpreters."""
    seconds, peaks = [], []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "peak.json"
        for _ in range(trials):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", CHILD, str(out), action, *args], env={**os.environ, **ONE_THREAD},
                                  capture_output=True, text=True)
            seconds.append(time.perf_counter() - started)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise EngramEvalError(f"bench --report: `{action} {' '.join(args)}` failed: {last}")
            peaks.append(json.loads(out.read_text())["peak_kib"] / 1024)
    return {"seconds": statistics.median(seconds), "peak_mib": statistics.median(peaks)}


def bench_report(run_dirs: list[Path], trials: int = 3) -> dict:
    """Reading the runs' results.parquet; `report RUN` of the first run in each format (table to a file, json, html);
    with several runs, `report RUN RUN ...` side by side -> each measure, and its time as a ratio to reading."""
    results = [str(run / "results.parquet") for run in run_dirs]
    read = measure("read", results[:1], trials)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for output_format in REPORT_FORMATS:
            rows[f"report --format {output_format}"] = measure(
                "report", [str(run_dirs[0]), "--format", output_format, "--output", str(Path(folder) / f"report.{output_format}")], trials)
        if len(run_dirs) > 1:
            read_all = measure("read", results, trials)
            side = measure("report", [*map(str, run_dirs), "--allow-different-banks", "--format", "json",
                                      "--output", str(Path(folder) / "side.json")], trials)
            rows[f"report of {len(run_dirs)} runs side by side (json)"] = {**side, "read_seconds": read_all["seconds"]}
    for row in rows.values():
        row["ratio_to_read"] = row["seconds"] / row.pop("read_seconds", read["seconds"])
    return {"run": str(run_dirs[0]), "threads": 1, "trials": trials, "read": read, "reports": rows}
