"""docs/findings_vectors.py: the steering-vector section of docs/findings.md. Every p it shows has its Benjamini-Hochberg
q over the section (scipy's false_discovery_control), verdicts follow q, the anti-steerable column is the share
counted here, the answer follows the vector's verdict against its random direction, and --update replaces only the
section."""

import json
import re
import sys

import polars as pl
import pytest
from scipy.stats import false_discovery_control

from conftest import REPO, load_script
from decisive import decisive_frame, decisive_run


@pytest.fixture(scope="module")
def script():
    sys.path.insert(0, str(REPO / "docs"))  # it imports docs/findings.py, as it does when run from docs/
    try:
        yield load_script("docs/findings_vectors.py")
    finally:
        sys.path.remove(str(REPO / "docs"))


def write_run(folder, seed: int, vector: bool):
    from engram_eval.run.rundir import RESULTS_FORMAT

    folder.mkdir()
    frame = decisive_frame(seed)
    run = {**decisive_run(), "results_format": RESULTS_FORMAT, "run_id": f"decisive{seed}"}
    if vector:  # the constructed run as a vector run: its random kind as the random direction, anti as the negated
        frame = frame.filter(pl.col("control_kind").is_null() | pl.col("control_kind").is_in(["random", "anti"])).with_columns(
            control_kind=pl.col("control_kind").replace({"random": "random-direction", "anti": "negated"}))
        run["vector"] = {"name": "truth"}
    frame.write_parquet(folder / "results.parquet")
    (folder / "run.json").write_text(json.dumps(run))
    return folder


ROW = re.compile(r"^\| (\w+) \| (the [^|]+) \| [^|]+ \| ([\w-]+) \| [^|]+ \| [^|]+ \| ([^|]+) \| (\d+%|-) \|", re.M)


def test_section(script, tmp_path):
    engram, vector = write_run(tmp_path / "engram", 7, False), write_run(tmp_path / "vector", 3, True)
    lines = script.section([("capitals", str(engram), str(vector))])
    text = "\n".join(lines)
    rows = ROW.findall(text)
    assert [(r[1], r[2]) for r in rows] == [("the relevant engram", k) for k in ("relevant", "anti", "irrelevant", "random")] + [
        ("the vector 'truth'", k) for k in ("relevant", "negated", "random-direction")]
    tests = [r[3] for r in rows if r[3].strip() != "-"]
    p = [float(re.search(r"p (\d\.\d{4})", t).group(1)) for t in tests]
    q = [float(re.search(r"q (\d\.\d{4})", t).group(1)) for t in tests]
    exact = [c for path in (engram, vector) for c in script.side(str(path))["summary"]["controls"]]
    assert p == pytest.approx([round(c["p_value"], 4) for c in exact], abs=1e-4)
    assert q == pytest.approx([round(v, 4) for v in false_discovery_control([c["p_value"] for c in exact], method="bh")], abs=1e-4)
    for test, shown_q in zip(tests, q):
        assert ("beats controls" in test or "beat relevant" in test) == (shown_q < 0.05)
    for (_, steered, kind, _, anti), path in zip(rows, [engram] * 4 + [vector] * 3):
        frame = pl.read_parquet(path / "results.parquet")
        cells = frame.filter((pl.col("role") == "relevant") if kind == "relevant" else (pl.col("control_kind") == kind))
        shares = [sum((r["strength"] > 0) == (r["log_improvement"] < 0) for r in group.to_dicts()) / group.height
                  for _, group in cells.group_by("question_id")]
        assert anti == f"{100 * sum(shares) / len(shares):.0f}%"
    verdict = next(t for (_, _, k, t, _) in rows if k == "random-direction")
    assert ("Not entirely" in text) == ("relevant beats controls" in verdict) != ("Yes, on this model" in text)
    page = "# Findings\n\nkept\n"
    once = script.replace_block(page, script.START, script.END, text)
    assert once.startswith(page.rstrip("\n")) and script.replace_block(once, script.START, script.END, "new") == page.rstrip("\n") + "\n\nnew\n"
