"""Every number the report shows, recounted from the rows with polars and scipy written here (not the package's
helpers), on a constructed run where the tests decide (tests/decisive.py) and on tiny-model runs for the chunk-count,
RAG, generation and side-by-side sections."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import polars as pl
import pytest
from conftest import module_unless_mapping, sweep, write_tiny_bank
from decisive import QUESTIONS, WRONG, decisive_frame, decisive_run
from scipy.stats import binomtest, false_discovery_control, permutation_test

from engram_eval.report.summary import summarize


@pytest.fixture(scope=module_unless_mapping)
def frame() -> pl.DataFrame:
    return decisive_frame()


@pytest.fixture(scope=module_unless_mapping)
def summary(frame) -> dict:
    return summarize(frame, decisive_run(), split=1)


def wilson(k: int, n: int) -> list[float]:
    ci = binomtest(k, n).proportion_ci(method="wilson")
    return [max(0.0, ci.low), min(1.0, ci.high)]


def assert_rate(got: dict, k: int, n: int) -> None:
    assert (got["k"], got["n"]) == (k, n)
    if n:
        assert got["rate"] == pytest.approx(k / n) and got["ci95"] == pytest.approx(wilson(k, n), abs=1e-9)
    else:
        assert got["rate"] is None


def exact_sign_flip(differences: list[float]) -> float:
    """All 2^n sign patterns, counted here: the share whose |mean| reaches the observed one."""
    d = np.asarray(differences)
    signs = np.array(list(itertools.product((1, -1), repeat=len(d))))
    means = np.abs(signs @ d) / len(d)
    return float(np.mean(means >= abs(d.mean()) * (1 - 1e-12)))


def per_question_difference(frame: pl.DataFrame, kind: str) -> pl.DataFrame:
    keys = ["question_id", "layer", "strength", "chunks"]
    rel = frame.filter(pl.col("role") == "relevant").select(*keys, rel="log_improvement")
    ctl = frame.filter(pl.col("control_kind") == kind).select(*keys, ctl="log_improvement")
    return (rel.join(ctl, on=keys).group_by("question_id").agg(d=(pl.col("rel") - pl.col("ctl")).mean()).sort("question_id"))


def labelled(frame: pl.DataFrame) -> pl.DataFrame:
    """With and without its context, a question is two units: `q01 +context`, `q01 -context`."""
    return frame.with_columns(question_id=pl.when(pl.col("context").is_null()).then(pl.col("question_id")).otherwise(
        pl.col("question_id") + pl.when(pl.col("context")).then(pl.lit(" +context")).otherwise(pl.lit(" -context"))))


def check_questions(frame: pl.DataFrame, summary: dict) -> None:
    frame = labelled(frame)
    relevant = frame.filter(pl.col("role") == "relevant")
    for q in summary["questions"]:
        mine = relevant.filter(pl.col("question_id") == q["question_id"])
        base = frame.filter((pl.col("role") == "baseline") & (pl.col("question_id") == q["question_id"])).row(0, named=True)
        assert (q["baseline_ratio"], q["baseline_p_correct"], q["correct_before"]) == (base["ratio"], base["p_correct"], base["correct_before"])
        flipped = mine.filter(pl.col("flipped"))
        assert q["flips"] == flipped.height and q["breaks"] == mine["broken"].sum()
        # a partition: collapsed, else p(correct) fell, else clean
        collapsed = [r for r in flipped.iter_rows(named=True) if r["collapsed"]]
        fell = [r for r in flipped.iter_rows(named=True) if not r["collapsed"] and not r["p_correct_rose"]]
        clean = [r for r in flipped.iter_rows(named=True) if not r["collapsed"] and r["p_correct_rose"]]
        assert (q["flips_collapsed"], q["flips_p_correct_fell"], q["clean_flips"]) == (len(collapsed), len(fell), len(clean))
        assert q["flips_collapsed"] + q["flips_p_correct_fell"] + q["clean_flips"] == q["flips"]
        assert q["cases"] == dict(Counter(mine["case"].to_list()))
        top = max(mine.iter_rows(named=True), key=lambda r: (r["ratio"], -r["chunks"], -r["layer"], -r["strength"]))
        best = q["best"]
        assert {k: best[k] for k in ("layer", "strength", "chunks", "ratio", "p_correct", "p_incorrect", "mass_ratio")} == {
            "layer": top["layer"], "strength": top["strength"], "chunks": top["chunks"], "ratio": top["ratio"],
            "p_correct": top["p_correct"], "p_incorrect": top["p_incorrect"], "mass_ratio": top["mass_ratio"]}
        assert best["improves_on_baseline"] == (top["ratio"] > base["ratio"])
        at_best = mine.filter((pl.col("layer") == top["layer"]) & (pl.col("chunks") == top["chunks"]))
        walk = {r["strength"]: r["ratio"] for r in at_best.iter_rows(named=True)}
        decision = q["decision"]
        if base["ratio"] > 10 or base["related_wrong"]:
            assert decision["strength"] is None
        elif base["ratio"] > 1:
            assert (decision["strength"], decision["measured_ratio"]) == (1.0, walk[1.0])
            assert decision["advice"] == f"correct, not confident: strength 1.0 (layer {top['layer']})"
        else:  # wrong: the walk 1 -> 5 at the best layer only, stopping at the first flip or a fall below 0.8 x the best
            best_so_far, stop = 0.0, None
            for strength in sorted(walk):
                if walk[strength] > 1 or walk[strength] < 0.8 * best_so_far:
                    stop = strength
                    break
                best_so_far = max(best_so_far, walk[strength])
            stop = stop or max(walk)
            assert (decision["strength"], decision["measured_ratio"]) == (stop, walk[stop])
            assert decision["measured_correct"] == (walk[stop] > 1)
            assert f"layer {top['layer']}" in decision["advice"]


def test_per_question_counts_best_cell_and_decision(frame, summary):
    check_questions(frame, summary)


def test_per_question_numbers_in_a_chunk_grid_with_both_context_conditions():
    """Ties everywhere: k = 8 repeats k = 16's ratios at swapped layers, so the best cell's lowest-k, lowest-layer,
    lowest-strength tie-break decides; the decision walks the best cell's own layer and k."""
    from decisive import every_section_frame, every_section_run

    frame = every_section_frame()
    check_questions(frame, summarize(frame, every_section_run()))


def test_the_best_cell_must_beat_the_baseline_to_improve_on_it(frame):
    """A best cell whose ratio equals the baseline's does not improve on it."""
    base = frame.filter(pl.col("role") == "baseline").select("question_id", b="ratio")
    capped = frame.join(base, on="question_id").with_columns(
        ratio=pl.when(pl.col("role") == "relevant").then(pl.min_horizontal("ratio", "b")).otherwise(pl.col("ratio"))).drop("b")
    for q in summarize(capped, decisive_run())["questions"]:
        assert q["best"]["ratio"] == q["baseline_ratio"] and q["best"]["improves_on_baseline"] is False


def test_headline_rates_and_best_cell(frame, summary):
    relevant = frame.filter(pl.col("role") == "relevant")
    per_q = relevant.group_by("question_id").agg(wrong=~pl.col("correct_before").first(), flips=pl.col("flipped").any(),
                                                 breaks=pl.col("broken").any(),
                                                 clean=(pl.col("flipped") & pl.col("p_correct_rose") & ~pl.col("collapsed")).any())
    wrong, right = per_q.filter(pl.col("wrong")), per_q.filter(~pl.col("wrong"))
    hl = summary["headline"]
    assert_rate(hl["question_flip_rate"], wrong["flips"].sum(), wrong.height)
    assert_rate(hl["question_clean_flip_rate"], wrong["clean"].sum(), wrong.height)
    assert_rate(hl["question_fragile_correct_rate"], right["breaks"].sum(), right.height)
    cells = relevant.group_by("layer", "strength").agg(flips=pl.col("flipped").sum(), wrong=(~pl.col("correct_before")).sum(),
                                                       breaks=pl.col("broken").sum(), right=pl.col("correct_before").sum())
    top = max(cells.iter_rows(named=True), key=lambda c: (c["flips"] / c["wrong"], -c["breaks"] / c["right"], -c["layer"], -c["strength"]))
    best = hl["best_cell"]
    assert (best["layer"], best["strength"]) == (top["layer"], top["strength"]) == (2, 5.0)
    assert_rate(best["flip_rate"], top["flips"], top["wrong"])
    assert_rate(best["break_rate"], top["breaks"], top["right"])
    for cell in cells.iter_rows(named=True):
        i, j = [1, 2].index(cell["layer"]), [1.0, 5.0].index(cell["strength"])
        assert_rate(summary["heatmaps"]["relevant"]["flip"][i][j], cell["flips"], cell["wrong"])
        assert_rate(summary["heatmaps"]["relevant"]["break"][i][j], cell["breaks"], cell["right"])
    assert summary["header"]["cells"] == frame.height and summary["header"]["questions"] == 20


def bootstrap_ci(values: list[float]) -> list[float]:
    from scipy.stats import bootstrap

    result = bootstrap((np.sort(values),), np.mean, n_resamples=9999, method="percentile", rng=np.random.default_rng(0))
    return [result.confidence_interval.low, result.confidence_interval.high]


def check_controls(frame: pl.DataFrame, summary: dict) -> dict:
    """Each control's row recounted: flips and breaks over each computed cell once (a row marked `repeated` repeats
    another's), the adjusted flip rate as a per-question difference of flip shares with its bootstrap interval."""
    keys = ["question_id", "layer", "strength", "chunks"]
    relevant = frame.filter(pl.col("role") == "relevant")
    verdicts = {}
    for c in summary["controls"]:
        control = frame.filter(pl.col("control_kind") == c["kind"])
        shared = control.select(keys).unique()
        rel = relevant.join(shared, on=keys, how="semi")
        ctl = control.filter(~pl.col("repeated")).join(relevant.select(keys), on=keys, how="semi")
        assert (c["cells_relevant"], c["cells_control"], c["questions"]) == (rel.height, ctl.height, rel["question_id"].n_unique())
        assert (c["flips_relevant"], c["flips_control"]) == (rel["flipped"].sum(), ctl["flipped"].sum())
        assert (c["breaks_relevant"], c["breaks_control"]) == (rel["broken"].sum(), ctl["broken"].sum())
        assert c["mean_log_improvement_relevant"] == pytest.approx(rel["log_improvement"].mean())
        assert c["mean_log_improvement_control"] == pytest.approx(ctl["log_improvement"].mean())
        differences = []
        for qid in sorted(set(rel.filter(~pl.col("correct_before"))["question_id"])):
            mine, theirs = rel.filter(pl.col("question_id") == qid), ctl.filter(pl.col("question_id") == qid)
            differences.append(mine["flipped"].sum() / mine.height - theirs["flipped"].sum() / theirs.height)
        adjusted = c["adjusted_flip_difference"]
        assert adjusted["questions"] == len(differences) and adjusted["difference"] == pytest.approx(np.mean(differences))
        if len(set(differences)) > 1:
            assert adjusted["ci95"] == pytest.approx(bootstrap_ci(differences))
        else:
            assert adjusted["ci95"] is None
        d = per_question_difference(frame, c["kind"])["d"].to_list()
        assert c["mean_difference"] == pytest.approx(np.mean(d))
        verdicts[c["kind"]] = c["verdict"]
    return verdicts


def test_controls_table_both_sides_and_the_adjusted_rate(frame, summary):
    verdicts = check_controls(frame, summary)
    assert verdicts == {"anti": "relevant beats controls", "random": "controls beat relevant", "irrelevant": verdicts["irrelevant"]}


def with_null_prefixes(frame: pl.DataFrame) -> pl.DataFrame:
    """Two null prefixes (one kind) as the sweep writes them under prefix injection: computed at the first layer,
    repeated at the second (`repeated`), the same numbers in both rows."""
    base = frame.filter(pl.col("control_kind") == "random")
    nulls = []
    for name, shift in (("~gaussian", 0.0), ("~mean-token", -0.3)):
        first = base.filter(pl.col("layer") == 1).with_columns(
            engram=pl.lit(name), engram_key=pl.lit(None, pl.String), control_kind=pl.lit("null-prefix"),
            log_improvement=pl.col("log_improvement") + shift)
        nulls += [first, first.with_columns(layer=pl.lit(2, pl.Int32), repeated=pl.lit(True))]
    return pl.concat([frame, *nulls])


def test_null_prefix_cells_are_counted_once():
    frame = with_null_prefixes(decisive_frame())
    summary = summarize(frame, decisive_run())
    check_controls(frame, summary)
    null = next(c for c in summary["controls"] if c["kind"] == "null-prefix")
    computed = frame.filter((pl.col("control_kind") == "null-prefix") & ~pl.col("repeated"))
    # 20 questions x 2 strengths x 2 null prefixes computed; the relevant engram's 80 cells each counted once
    assert (null["cells_control"], null["cells_relevant"]) == (80, 80) == (computed.height, 80)
    assert null["flips_control"] == computed["flipped"].sum() == 40


def test_the_headline_per_engram_kind(frame, summary):
    """Per kind, recounted from the rows: questions that flip somewhere over the baseline-wrong questions that have the
    kind, questions that break somewhere over the baseline-correct ones, and the controls' verdicts beside them."""
    frame = with_null_prefixes(frame)
    summary = summarize(frame, decisive_run())
    by_kind = summary["headline"]["by_kind"]
    assert [k["kind"] for k in by_kind] == ["relevant", "anti", "irrelevant", "null-prefix", "random"]
    tested = {c["kind"]: c for c in summary["controls"]}
    for entry in by_kind:
        rows = frame.filter(pl.col("role") == "relevant") if entry["kind"] == "relevant" else frame.filter(pl.col("control_kind") == entry["kind"])
        wrong = {q for q in rows["question_id"].unique() if q in WRONG}
        right = set(rows["question_id"].unique()) - wrong
        flipping = set(rows.filter(pl.col("flipped"))["question_id"])
        breaking = set(rows.filter(pl.col("broken"))["question_id"])
        assert_rate(entry["question_flip_rate"], len(flipping & wrong), len(wrong))
        assert_rate(entry["question_fragile_correct_rate"], len(breaking & right), len(right))
        expected = tested.get(entry["kind"], {"verdict": None, "p_value": None})
        assert (entry["verdict"], entry["p_value"]) == (expected["verdict"], expected["p_value"])
    assert by_kind[0]["question_flip_rate"]["k"] == 10 and by_kind[0]["question_fragile_correct_rate"]["k"] == 1
    verdicts = {c["kind"]: c["verdict"] for c in summary["controls"]}
    indistinguishable = sorted(k for k, v in verdicts.items() if v.startswith("indistinguishable"))
    conclusion = summary["headline"]["conclusion"]
    assert conclusion.startswith("the relevant engram beats 1 of 4 control kinds (anti)")
    assert "is beaten by " in conclusion and "random" in conclusion.split("is beaten by ")[1]
    if indistinguishable:
        assert f"is indistinguishable from {len(indistinguishable)} of 4 control kinds ({', '.join(indistinguishable)})" in conclusion


def test_the_sampled_sign_flip_path_agrees_with_the_exact_enumeration(frame, summary):
    """20 questions: above the exact limit, the report samples 200,000 sign patterns; the exact share over all 2^20
    is counted here, and the two agree within four Monte-Carlo standard errors."""
    irrelevant = next(c for c in summary["controls"] if c["kind"] == "irrelevant")
    d = per_question_difference(frame, "irrelevant")["d"].to_list()
    exact = exact_sign_flip(d)
    assert 0.01 < exact < 0.9  # a p-value of moderate size, so the comparison means something
    assert abs(irrelevant["p_value"] - exact) <= 4 * np.sqrt(exact * (1 - exact) / 200_000)
    anti = next(c for c in summary["controls"] if c["kind"] == "anti")
    assert anti["p_value"] == pytest.approx(exact_sign_flip(per_question_difference(frame, "anti")["d"].to_list()), abs=1e-5)
    scipy_p = permutation_test((np.array(d),), np.mean, permutation_type="samples", n_resamples=200_000,
                               rng=np.random.default_rng(1)).pvalue
    assert abs(scipy_p - exact) <= 4 * np.sqrt(exact * (1 - exact) / 200_000)


def test_per_cell_tests_survive_correction_and_their_counts(frame, summary):
    keys = ["question_id", "layer", "strength"]
    rel = frame.filter(pl.col("role") == "relevant").select(*keys, rf="flipped", rb="broken")
    expected = []
    for (layer, strength, kind), group in sorted(frame.filter(pl.col("role") == "control").join(rel, on=keys)
                                                 .group_by("layer", "strength", "control_kind"), key=lambda g: g[0]):
        for outcome, column, other, eligible in (("flip", "flipped", "rf", False), ("break", "broken", "rb", True)):
            rows = group.filter(pl.col("correct_before") == eligible)
            a = int((rows[other] & ~rows[column]).sum())
            b = int((~rows[other] & rows[column]).sum())
            p = 1.0 if a + b == 0 else binomtest(a, a + b).pvalue
            expected.append(((layer, strength, kind, outcome), a, b, p))
    q = false_discovery_control([e[3] for e in expected], method="bh")
    got = {(t["layer"], t["strength"], t["control"], t["outcome"]): t for t in summary["tests"]}
    assert len(got) == len(expected)
    for (key, a, b, p), q_value in zip(expected, q):
        t = got[key]
        assert (t["relevant_only"], t["control_only"]) == (a, b)
        assert t["p_value"] == pytest.approx(p) and t["q_value"] == pytest.approx(q_value) and t["survives"] == (q_value < 0.05)
    survivors = {k for k, t in got.items() if t["survives"]}
    assert (2, 5.0, "anti", "flip") in survivors  # the relevant engram beats a control, cell by cell
    assert (1, 1.0, "random", "flip") in survivors  # and a control beats the relevant engram


def test_semantic_sink_split_counts_breaks_and_flips(frame, summary):
    relevant = frame.filter(pl.col("role") == "relevant")
    for s in summary["semantic_sink"]:
        mine = relevant.filter(pl.col("related_wrong") == s["related_wrong"])
        assert s["questions"] == mine["question_id"].n_unique()
        assert_rate(s["flip"], mine["flipped"].sum(), (~mine["correct_before"]).sum())
        assert_rate(s["break"], mine["broken"].sum(), mine["correct_before"].sum())
    assert [s["related_wrong"] for s in summary["semantic_sink"]] == [False, True]


def test_effect_sizes_and_the_held_out_split(frame, summary):
    relevant = frame.filter(pl.col("role") == "relevant")
    effects = summary["effects"]["all"]
    for i, layer in enumerate(effects["layers"]):
        for j, strength in enumerate(effects["strengths"]):
            values = relevant.filter((pl.col("layer") == layer) & (pl.col("strength") == strength))["log_improvement"]
            cell = effects["maps"]["relevant"][i][j]
            assert cell["n"] == values.len() and cell["mean"] == pytest.approx(values.mean())
            assert cell["ci95"] is None or cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1]
    split = summary["split"]
    rng, chosen = np.random.default_rng(1), []  # stratified: 5 of the 10 baseline-wrong questions, 5 of the 10 right
    for stratum in (sorted(WRONG), sorted(set(QUESTIONS) - WRONG)):
        chosen += [stratum[i] for i in rng.permutation(10)[:5]]
    assert (split["chosen_on"], split["measured_on"]) == (sorted(chosen), sorted(set(QUESTIONS) - set(chosen)))

    def rates(ids):
        return relevant.filter(pl.col("question_id").is_in(ids)).group_by("layer", "strength").agg(
            f=pl.col("flipped").sum(), w=(~pl.col("correct_before")).sum(), b=pl.col("broken").sum(), c=pl.col("correct_before").sum())

    chosen = rates(split["chosen_on"]).with_columns(fr=pl.col("f") / pl.col("w").clip(1), br=pl.col("b") / pl.col("c").clip(1))
    top = max(chosen.iter_rows(named=True), key=lambda r: (r["fr"], -r["br"], -r["layer"], -r["strength"]))
    assert (split["cell"]["layer"], split["cell"]["strength"]) == (top["layer"], top["strength"])
    assert_rate(split["flip_rate_where_chosen"], top["f"], top["w"])
    held = rates(split["measured_on"]).filter((pl.col("layer") == top["layer"]) & (pl.col("strength") == top["strength"])).row(0, named=True)
    assert_rate(split["flip_rate_held_out"], held["f"], held["w"])
    assert_rate(split["break_rate_held_out"], held["b"], held["c"])


def test_the_generation_summary_recounted():
    from engram_eval.report.experiments import generation_summary

    rows = []
    for i in range(18):
        role = "baseline" if i < 5 else "relevant" if i < 12 else "control"
        rows.append({"question_id": f"q{i}", "role": role, "control_kind": "random" if role == "control" else None,
                     "engram": None if role == "baseline" else "e", "layer": None if role == "baseline" else 1,
                     "strength": None if role == "baseline" else 2.0, "context": None, "ratio": [0.5, 2.0, 1.0][i % 3],
                     "flipped": None if role == "baseline" else i % 2 == 0, "verdict": ["correct", "incorrect", "both", "neither"][i % 4],
                     "first_answer": ["correct", "incorrect", None][i % 3], "text": f"text {i}"})
    generations = pl.DataFrame(rows)
    g = generation_summary(generations)
    probability = ["correct" if r["ratio"] > 1 else "incorrect" if r["ratio"] < 1 else "tie" for r in rows]
    for p in ("correct", "incorrect", "tie"):
        for v in ("correct", "incorrect", "both", "neither"):
            assert g["confusion"][p][v] == sum(pp == p and r["verdict"] == v for pp, r in zip(probability, rows))
    assert [k["kind"] for k in g["by_kind"]] == ["baseline", "relevant", "random"]  # never pooled across kinds
    for entry in g["by_kind"]:
        mine = [r for r in rows if (r["control_kind"] or r["role"]) == entry["kind"]]
        flipped = [r for r in mine if r["flipped"]]
        assert entry["rows"] == len(mine) == {"baseline": 5, "relevant": 7, "random": 6}[entry["kind"]]
        assert_rate(entry["says_correct_first"], sum(r["first_answer"] == "correct" for r in mine), len(mine))
        assert_rate(entry["probability_correct"], sum(r["ratio"] > 1 for r in mine), len(mine))
        if entry["kind"] == "baseline":
            assert entry["flipped_says_correct_first"] is None
        else:
            assert_rate(entry["flipped_says_correct_first"], sum(r["first_answer"] == "correct" for r in flipped), len(flipped))
    assert g["cells"] == 18


def test_chunk_count_rag_and_side_by_side_recounted(tiny, tmp_path):
    from engram_eval.report.comparison import summarize_runs
    from engram_eval.report.summary import load_run

    bank = write_tiny_bank(tmp_path)
    bank.write_text(bank.read_text().replace("  engram: topic\n", '  engram: topic\n  context: "Alpha blockers come first."\n'))
    result = sweep(tiny, bank, tmp_path / "run", layers=[1, 2], strengths=[1.0, 5.0, 20.0], chunks=[4, 8], context="both")
    frame, run = load_run(result.out)
    summary = summarize(frame, run)
    relevant = frame.filter(pl.col("role") == "relevant")
    keys = ["question_id", "layer", "strength", "chunks", "context"]
    anti = frame.filter(pl.col("control_kind") == "anti").join(relevant.select(*keys, rel="ratio"), on=keys)
    for row in summary["chunk_count"]:
        at_k = relevant.filter(pl.col("chunks") == row["chunks"])
        per_question = at_k.group_by("question_id").agg(pl.col("log_improvement").mean())["log_improvement"]
        assert row["mean_log_improvement"] == pytest.approx(per_question.mean())
        a = anti.filter(pl.col("chunks") == row["chunks"])
        beats = int((a["rel"] > a["ratio"]).sum())
        assert (row["directional"]["k"], row["directional"]["n"]) == (beats, a.height)
    rag = summary["rag"]
    assert rag["questions"] == 3
    base = {(r["question_id"], r["context"]): r["correct_before"] for r in frame.filter(pl.col("role") == "baseline").iter_rows(named=True)}
    with_context = relevant.filter(pl.col("context"))
    for condition in rag["conditions"]:
        here = relevant.filter((pl.col("layer") == condition["layer"]) & (pl.col("strength") == condition["strength"]))
        at = {(r["question_id"], r["context"]): r["correct_after"] for r in here.iter_rows(named=True)}
        qs = ["q1", "q2", "q3"]
        assert_rate(condition["no engram"], sum(base[(q, False)] for q in qs), 3)
        assert_rate(condition["context only"], sum(base[(q, True)] for q in qs), 3)
        assert_rate(condition["engram only"], sum(at[(q, False)] for q in qs), 3)
        assert_rate(condition["engram + context"], sum(at[(q, True)] for q in qs), 3)
        a = sum(at[(q, True)] and not base[(q, True)] for q in qs)
        b = sum(base[(q, True)] and not at[(q, True)] for q in qs)
        assert (condition["engram_context_only"], condition["context_only"]) == (a, b)
        assert condition["p_value"] == pytest.approx(1.0 if a + b == 0 else binomtest(a, a + b).pvalue)
    best = max(with_context.group_by("layer", "strength").agg(n=pl.col("correct_after").sum()).iter_rows(named=True),
               key=lambda r: (r["n"], -r["layer"], -r["strength"]))
    assert (rag["conditions"][0]["layer"], rag["conditions"][0]["strength"]) == (best["layer"], best["strength"])
    (tmp_path / "other").mkdir()
    other = sweep(tiny, write_tiny_bank(tmp_path / "other"), tmp_path / "run2", layers=[1], strengths=[1.0], chunks=4)
    side = summarize_runs([("a", frame, run), ("b", *load_run(other.out))], allow_different_banks=True)
    for column, run_dir in zip(side["runs"], (result.out, other.out)):
        rows = pl.read_parquet(run_dir / "results.parquet").filter(pl.col("role") == "baseline")
        assert_rate(column["baseline_accuracy"], int(rows["correct_before"].sum()), rows.height)


def test_heatmaps_per_k_in_a_chunk_grid():
    from decisive import every_section_frame, every_section_run

    frame = labelled(every_section_frame())
    summary = summarize(every_section_frame(), every_section_run(), engram_role="all")
    kinds = ("relevant", "anti", "irrelevant", "random")
    assert set(summary["heatmaps"]) == {f"{kind} k={k}" for kind in kinds for k in (8, 16)}
    for kind in kinds:
        for k in (8, 16):
            heatmap = summary["heatmaps"][f"{kind} k={k}"]
            cells = frame.filter((pl.col("control_kind") == kind) if kind != "relevant" else (pl.col("role") == "relevant"))
            for i, layer in enumerate(heatmap["layers"]):
                for j, strength in enumerate(heatmap["strengths"]):
                    here = cells.filter((pl.col("chunks") == k) & (pl.col("layer") == layer) & (pl.col("strength") == strength))
                    flip, brk = heatmap["flip"][i][j], heatmap["break"][i][j]
                    assert_rate(flip, int(here["flipped"].sum()), int((~here["correct_before"]).sum()))
                    assert_rate(brk, int(here["broken"].sum()), int(here["correct_before"].sum()))
                    assert flip["questions"] == sorted(set(here.filter(pl.col("flipped"))["question_id"]))
                    assert brk["questions"] == sorted(set(here.filter(pl.col("broken"))["question_id"]))
    assert summary["heatmaps"]["relevant k=8"]["flip"] != summary["heatmaps"]["relevant k=16"]["flip"]


def test_effect_sizes_at_each_k_of_a_chunk_grid_recounted():
    """Each k's maps from that k's rows alone, per unit (a question in one context condition) then over units, with
    scipy's seeded bootstrap."""
    from decisive import every_section_frame, every_section_run
    from scipy.stats import bootstrap

    frame = every_section_frame()
    summary = summarize(frame, every_section_run())
    ks = sorted(frame["chunks"].drop_nulls().unique().to_list())
    assert len(ks) > 1 and sorted(summary["effects"]) == sorted(f"k={k}" for k in ks)
    for k in ks:
        effects = summary["effects"][f"k={k}"]
        assert effects["chunks"] == k
        at_k = frame.filter(pl.col("chunks") == k)
        for i, layer in enumerate(effects["layers"]):
            for j, strength in enumerate(effects["strengths"]):
                cell = at_k.filter((pl.col("layer") == layer) & (pl.col("strength") == strength))
                relevant = cell.filter(pl.col("role") == "relevant").group_by("question_id", "context").agg(pl.col("log_improvement").mean())
                per_question = {(r["question_id"], r["context"]): r["log_improvement"] for r in relevant.iter_rows(named=True)}
                got = effects["maps"]["relevant"][i][j]
                values = np.sort(list(per_question.values()))
                assert got["n"] == len(values) and got["mean"] == pytest.approx(values.mean())
                if len(set(values)) > 1:
                    ci = bootstrap((values,), np.mean, n_resamples=9999, method="percentile", rng=np.random.default_rng(0))
                    assert got["ci95"] == pytest.approx((ci.confidence_interval.low, ci.confidence_interval.high))
                for kind in ("anti", "irrelevant", "random"):
                    controls = cell.filter(pl.col("control_kind") == kind).group_by("question_id", "context").agg(
                        pl.col("log_improvement").mean())
                    differences = [per_question[(r["question_id"], r["context"])] - r["log_improvement"]
                                   for r in controls.iter_rows(named=True)]
                    if differences:
                        mine = effects["maps"][f"relevant - {kind}"][i][j]
                        assert mine["n"] == len(differences) and mine["mean"] == pytest.approx(np.mean(differences))
