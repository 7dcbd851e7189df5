"""docs/findings.py: Benjamini-Hochberg q beside every p it shows (scipy's false_discovery_control recomputed here),
n per cell, "relevant beats controls" only at q < 0.05, and the large bank's calibration table."""

import json
import re

import numpy as np
import pytest
from scipy.stats import false_discovery_control

from conftest import load_script
from decisive import decisive_frame, decisive_run


@pytest.fixture(scope="module")
def findings():
    return load_script("docs/findings.py")


def write_run(folder, seed: int):
    from engram_eval.run.rundir import RESULTS_FORMAT

    folder.mkdir()
    decisive_frame(seed).write_parquet(folder / "results.parquet")
    (folder / "run.json").write_text(json.dumps({**decisive_run(), "results_format": RESULTS_FORMAT, "run_id": f"decisive{seed}"}))
    return folder


CELL = re.compile(r"(-?\d+\.\d+) \(n (\d+), p (\d\.\d{4}), q (\d\.\d{4})\): ([a-z ()=\d]+)")


def test_every_p_shown_has_its_bh_q_and_the_verdict_follows_q(findings, tmp_path):
    runs = [write_run(tmp_path / f"run{seed}", seed) for seed in (7, 3)]
    page = findings.main([f"a={runs[0]}", f"b={runs[1]}", "--large", f"big={runs[0]}"])
    main_table = page.split("## What the runs say")[0]
    cells = CELL.findall(main_table)
    assert len(cells) == 2 * 3  # two runs x three control kinds
    p = np.array([float(c[2]) for c in cells])
    exact = {}
    for label, run in (("a", runs[0]), ("b", runs[1])):
        exact[label] = {c["kind"]: c for c in findings.controls_by_kind(str(run))[1].values()}
    ordered = [exact[label][kind] for kind in sorted(exact["a"]) for label in ("a", "b")]  # the table's row-major order
    expected_q = false_discovery_control([c["p_value"] for c in ordered], method="bh")
    shown_q = [float(c[3]) for c in cells]
    assert shown_q == pytest.approx([round(q, 4) for q in expected_q], abs=1e-4)
    assert p == pytest.approx([round(c["p_value"], 4) for c in ordered], abs=1e-4)
    for (difference, n, _, q, verdict), control in zip(cells, ordered):
        verdict = verdict.strip()
        assert int(n) == control["questions"]
        if float(q) < 0.05:
            assert verdict == ("relevant beats controls" if float(difference) > 0 else "controls beat relevant")
        else:
            assert verdict != "relevant beats controls"
    assert "## Does engram stability predict when the model is right?" in page and "| stability |" in page


def test_the_paraphrase_columns_put_each_paraphrase_in_the_sources_place(findings, tmp_path):
    import polars as pl

    from engram_eval.report.summary import summarize
    from engram_eval.run.rundir import RESULTS_FORMAT

    frame = decisive_frame(7)
    relevant = pl.col("role") == "relevant"
    frame = frame.with_columns(paraphrase=pl.when(relevant).then(0).cast(pl.Int32))
    reworded = frame.filter(relevant).with_columns(paraphrase=pl.lit(1, pl.Int32), log_improvement=pl.col("log_improvement") * 0.25,
                                                   flipped=pl.lit(False))
    folder = tmp_path / "run"
    folder.mkdir()
    pl.concat([frame, reworded]).write_parquet(folder / "results.parquet")
    (folder / "run.json").write_text(json.dumps({**decisive_run(), "results_format": RESULTS_FORMAT, "run_id": "decisive7"}))
    page = findings.main([f"seed={folder}", "--paraphrases", f"seed={folder}"])
    header = page.splitlines()[4]
    assert header == "| control kind | seed | seed, paraphrase 1 |"
    # The column is the run summarized with paraphrase 1's rows as the relevant engram's, built here by hand.
    by_hand = pl.concat([frame.filter(~relevant), reworded.with_columns(paraphrase=pl.lit(0, pl.Int32))])
    expected = {c["kind"]: c for c in summarize(by_hand, decisive_run())["controls"]}
    got = findings.controls_by_kind(str(folder), 1)[1]
    assert {k: (c["mean_difference"], c["p_value"], c["flips_relevant"]) for k, c in got.items()} == \
        {k: (c["mean_difference"], c["p_value"], c["flips_relevant"]) for k, c in expected.items()}
    assert "| survives rewording: flipped by every paraphrase / by any (relevant) | 0/10 | - |" in page  # once, the source's


MODEL_CELL = re.compile(r"(-?\d+\.\d+) \(p (\d\.\d{4}), q (\d\.\d{4})\): ([a-z ()=\d]+)")


def test_the_two_model_table_corrects_every_p_it_shows_and_says_what_replicates(findings, tmp_path):
    import polars as pl

    runs = {"small": write_run(tmp_path / "small", 7), "large": write_run(tmp_path / "large", 3)}
    models = [("small", [str(runs["small"])]), ("large", [str(runs["large"])])]
    page = findings.main([f"a={runs['small']}", "--model", f"small={runs['small']}", "--model", f"large={runs['large']}"])
    assert page.count(findings.MODELS_START) == 1 and findings.update(page, models) == page  # --update: the same page
    old = page.replace(page.split(findings.MODELS_START)[1].split(findings.MODELS_END)[0], "\nstale\n")
    assert findings.update(old, models) == page  # only the section is replaced
    section = page.split("## Does model size help?")[1]
    table = section.split("### What replicates")[0]
    rows = [line for line in table.splitlines() if line.startswith("| small |") or line.startswith("| large |")]
    assert len(rows) == 2
    cells = [MODEL_CELL.findall(row) for row in rows]
    controls = {label: findings.controls_by_kind(str(run))[1] for label, run in runs.items()}
    kinds = sorted(controls["small"])
    ordered = [controls[label][kind] for label in ("small", "large") for kind in kinds]  # this table's order
    expected_q = false_discovery_control([c["p_value"] for c in ordered], method="bh")
    shown = [c for row in cells for c in row]
    assert [float(c[2]) for c in shown] == pytest.approx([round(q, 4) for q in expected_q], abs=1e-4)
    for (difference, _, q, verdict), control in zip(shown, ordered):
        expected = ("relevant beats controls" if control["mean_difference"] > 0 else "controls beat relevant") \
            if float(q) < 0.05 else "indistinguishable from controls"
        assert verdict.strip() == expected
    assert all("| 0/20 |" in row for row in rows)  # the constructed runs: every answer on-distribution
    for label, row in zip(("small", "large"), rows):
        frame = pl.read_parquet(runs[label] / "results.parquet")
        best = findings.summarize(frame, json.loads((runs[label] / "run.json").read_text()))["headline"]["best_cell"]
        kl = frame.filter((pl.col("role") == "relevant") & (pl.col("layer") == best["layer"])
                          & (pl.col("strength") == best["strength"]))["kl_next"].median()
        assert f"| {kl:.3f} |" in row
    replicates = section.split("### What replicates across the two models")[1]
    by_kind = {kind: [v.strip() for v in (shown[i][3], shown[len(kinds) + i][3])] for i, kind in enumerate(kinds)}
    every = [v.strip() for v in (c[3] for c in shown)]
    assert (f"beats its control at q < 0.05 in {every.count('relevant beats controls')} of {len(every)} comparisons, and "
            f"loses in {every.count('controls beat relevant')}.") in replicates
    for kind, (small, large) in by_kind.items():
        if small == large:
            assert f"{kind} ({small})" in replicates
        else:
            assert f"{kind} (small: {small}, large: {large})" in replicates
