"""A constructed run where the tests decide: 20 questions (10 wrong at baseline, 10 right), a 2 x 2 grid, and three
control kinds built to be told apart:

- anti: always a little worse than the relevant engram (the relevant engram beats it), and never flips;
- random: flips every baseline-wrong question in every cell (it beats the relevant engram, which flips them only at
  L2 x5);
- irrelevant: differs from the relevant engram by seeded noise (p of moderate size: the sampled sign-flip path is
  checked against the exact enumeration).

The rows are written out here from (log p(correct), log p(incorrect)) with the formulas of docs/results.md, so the
report's numbers can be recounted against a frame whose every value the test knows."""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from engram_eval.run.results import RESULT_SCHEMA

QUESTIONS = [f"q{i:02d}" for i in range(1, 21)]
LAYERS = (1, 2)
STRENGTHS = (1.0, 5.0)
WRONG = set(QUESTIONS[:10])  # baseline-wrong questions
RELATED = set(QUESTIONS[::3])  # related_wrong questions (semantic sink split)


def case(baseline_ratio: float, ratio: float) -> str:
    if baseline_ratio == 1 or ratio == 1:
        return "TIE"
    if baseline_ratio > 1:
        return "HIGH_CONFIDENCE_CORRECT" if ratio > baseline_ratio else "CORRECT_WEAKENED" if ratio >= 1 else "FRAGILE_CORRECT"
    return "HIGH_CONFIDENCE_INCORRECT" if ratio < 1 else "RECOVERED_KNOWLEDGE"


def cell_log_ratio(question: int, qid: str, kind: str, layer: int, strength: float, noise: np.ndarray) -> float:
    base = -1.0 if qid in WRONG else 1.0
    if kind == "relevant":
        if qid in WRONG:
            return 0.8 if (layer, strength) == (2, 5.0) else base + 0.3 + 0.05 * layer
        return base - 1.6 if (qid == "q11" and strength == 5.0) else base + 0.1 * strength  # q11 breaks at strength 5
    if kind == "anti":
        return cell_log_ratio(question, qid, "relevant", layer, strength, noise) - 1.0 - 0.01 * question
    if kind == "random":
        return 1.5 if qid in WRONG else base + 0.2
    return cell_log_ratio(question, qid, "relevant", layer, strength, noise) - noise[question]  # irrelevant


DOSE_FACTOR = {"relevant": 1.0, "anti": 1.0, "irrelevant": 0.5, "random": 2.0}


def next_token_kl(kind: str, strength: float) -> float:
    """kl_next: 0.04 nats per unit of strength, half that for irrelevant, twice for random (they reach the report's
    target doses at other strengths: relevant and anti 0.05 and 0.2, irrelevant 0.05 only, random 0.2 only)."""
    return 0.04 * strength * DOSE_FACTOR[kind]


def decisive_frame(seed: int = 7) -> pl.DataFrame:
    noise = np.random.default_rng(seed).normal(0.15, 0.6, len(QUESTIONS))
    rows = []
    for i, qid in enumerate(QUESTIONS):
        base_log = -1.0 if qid in WRONG else 1.0
        logp_incorrect = math.log(0.3)
        entries = [("baseline", None, None, None, None, base_log, 0.0)]
        for kind in ("relevant", "anti", "irrelevant", "random"):
            for layer in LAYERS:
                for strength in STRENGTHS:
                    shift = -0.4 if kind == "random" else 0.1 * (i % 3)  # p(correct) falls under random; mass moves
                    entries.append((kind, layer, strength, layer, strength, cell_log_ratio(i, qid, kind, layer, strength, noise), shift))
        base_p_correct = math.exp(logp_incorrect + base_log)
        base_mass = base_p_correct + 0.3
        for kind, layer, strength, _, _, log_ratio, shift in entries:
            p_incorrect = math.exp(logp_incorrect + shift - (2.5 if kind == "random" and qid == "q02" else 0.0))
            p_correct = p_incorrect * math.exp(log_ratio)
            mass = p_correct + p_incorrect
            ratio = math.exp(log_ratio)
            baseline_ratio = math.exp(base_log)
            is_base = kind == "baseline"
            rows.append({
                "run_id": "decisive0001", "model": "constructed", "model_fingerprint": "f" * 64, "bank": "decisive",
                "question_id": qid, "tags": ["made"], "related_wrong": qid in RELATED,
                "engram": None if is_base else f"{kind}-{qid}" if kind in ("relevant", "anti") else kind,
                "engram_key": None if is_base else f"key-{kind}-{qid}",
                "role": "baseline" if is_base else "relevant" if kind == "relevant" else "control",
                "control_kind": None if kind in ("baseline", "relevant") else kind,
                "layer": layer, "strength": strength, "chunks": 16, "pooling": "mean", "skip_tokens": 0, "window": None,
                "scaling": "global", "injection": "prefix", "context": None, "scoring": "first-token", "repeated": False,
                "p_correct": p_correct, "p_incorrect": p_incorrect, "mass": mass, "mass_ratio": mass / base_mass,
                "collapsed": mass / base_mass < 0.1, "p_correct_rose": None if is_base else p_correct > base_p_correct,
                "top_token": " x", "p_top": 0.5, "kl_next": 0.0 if is_base else next_token_kl(kind, strength),
                "entropy_next": 2.0, "attn_prefix_share": None, "attn_first_share": None,
                "log_ratio": log_ratio, "ratio": ratio, "baseline_ratio": baseline_ratio,
                "improvement": math.exp(log_ratio - base_log), "log_improvement": log_ratio - base_log,
                "correct_before": baseline_ratio > 1, "correct_after": ratio > 1,
                "flipped": baseline_ratio < 1 < ratio, "broken": baseline_ratio > 1 > ratio,
                "case": None if is_base else case(baseline_ratio, ratio),
                "top_correct_variant": " a", "top_incorrect_variant": " b",
            })
    return pl.DataFrame(rows, schema=RESULT_SCHEMA)


def decisive_run() -> dict:
    return {"status": "complete", "settings": {"max_tokens": 2048}, "timings": {"total_seconds": 1.0}}


def every_section_frame() -> pl.DataFrame:
    """The decisive frame at two chunk counts, each question with and without a retrieved context, attention recorded:
    every section of the report has rows."""
    frame = decisive_frame()
    at_8 = frame.filter(pl.col("role") != "baseline").with_columns(chunks=pl.lit(8, RESULT_SCHEMA["chunks"]), layer=3 - pl.col("layer"))
    grid = pl.concat([frame, at_8])  # k = 8 is k = 16 with its layers swapped: the two heatmaps differ
    attention = {"attn_prefix_share": pl.lit(0.25, RESULT_SCHEMA["attn_prefix_share"]),
                 "attn_first_share": pl.lit(0.5, RESULT_SCHEMA["attn_first_share"])}
    both = pl.concat([grid.with_columns(context=pl.lit(True), **attention), grid.with_columns(context=pl.lit(False), **attention)])
    return both.select([pl.col(name).cast(dtype) for name, dtype in RESULT_SCHEMA.items()])


def every_section_frame_with_variants() -> pl.DataFrame:
    """every_section_frame whose relevant engram has a second paraphrase (shifted by -0.5 nats where it is not the
    flipping cell) and one sample drawn from the two: the variability sections have rows too."""
    frame = every_section_frame()
    relevant = pl.col("role") == "relevant"
    frame = frame.with_columns(paraphrase=pl.when(relevant).then(0).cast(RESULT_SCHEMA["paraphrase"]))
    reworded = frame.filter(relevant).with_columns(paraphrase=pl.lit(1, RESULT_SCHEMA["paraphrase"]),
                                                   log_improvement=pl.col("log_improvement") - 0.5)
    sampled = frame.filter(relevant).with_columns(paraphrase=pl.lit(None, RESULT_SCHEMA["paraphrase"]),
                                                  sample=pl.lit(0, RESULT_SCHEMA["sample"]))
    return pl.concat([frame, reworded, sampled])


def every_section_run() -> dict:
    return {**decisive_run(), "largest_chunk_share": {"relevant-q01": {"1": 0.4, "2": 0.6}},
            "anti_difference_signal": [{"question_id": q, "anti": f"anti-{q}", "chunks": k, "layer": layer, "difference_signal": 0.1 * k}
                                       for q in QUESTIONS for k in (8, 16) for layer in LAYERS]}


def every_section_side_effects(frame: pl.DataFrame) -> pl.DataFrame:
    """A neutral probe for every distinct cell of a frame: neutral_kl 0.1 nats per unit of strength (random: 0.3),
    perplexity ratio 1 + neutral_kl."""
    cells = frame.filter(pl.col("role") != "baseline").select("engram", "control_kind", "layer", "strength", "chunks").unique()
    kl = pl.col("strength") * pl.when(pl.col("control_kind") == "random").then(0.3).otherwise(0.1)
    return cells.with_columns(neutral_kl=kl).with_columns(neutral_ppl_ratio=1 + pl.col("neutral_kl")).drop("control_kind")


def every_section_run_with_probe() -> dict:
    return {**every_section_run(), "side_effects": {"passage": "default", "passage_sha256": "0" * 64, "tokens": 200}}


def every_section_ensembled() -> pl.DataFrame:
    """`generate --ensemble 2 --reextract`'s texts of the same cells, every other one different."""
    plain = every_section_generations()
    return plain.with_columns(ensemble=pl.lit(2), ensemble_decay=pl.lit(0.01), reextract=pl.lit(True),
                              text=pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.col("text") + " again").otherwise(pl.col("text")))


def every_section_generations() -> pl.DataFrame:
    rows = []
    for i, qid in enumerate(QUESTIONS[:8]):
        for role in ("baseline", "relevant"):
            rows.append({"question_id": qid, "role": role, "control_kind": None, "engram": None if role == "baseline" else f"relevant-{qid}",
                         "layer": None if role == "baseline" else 2, "strength": None if role == "baseline" else 5.0, "chunks": 16,
                         "context": True, "ratio": [0.5, 2.0, 1.0][i % 3], "flipped": None if role == "baseline" else i % 2 == 0,
                         "verdict": ["correct", "incorrect", "both", "neither"][i % 4], "first_answer": ["correct", "incorrect", "none"][i % 3],
                         "text": f"text {i}\nmore"})
    return pl.DataFrame(rows)



def every_section_answers(frame: pl.DataFrame) -> pl.DataFrame:
    """RUN/answers.parquet for a constructed frame: per row, the correct answer at log p_correct, the incorrect one at
    log p_incorrect (related wrong where the question is marked related_wrong, else other) and an unrelated wrong answer
    one nat below it, shifted by seeded noise: the semantic-sink sections have rows."""
    from engram_eval.run.results import ANSWER_KEYS, ANSWER_SCHEMA

    base = frame.with_row_index("row").with_columns(noise=pl.Series(np.random.default_rng(3).normal(0.0, 0.3, frame.height)))
    wrong = pl.when(pl.col("related_wrong")).then(pl.lit("related wrong")).otherwise(pl.lit("other"))
    parts = [base.with_columns(variant=pl.lit(" right"), answer_role=pl.lit("correct"), logp=pl.col("p_correct").log(), order=0),
             base.with_columns(variant=pl.lit(" near"), answer_role=wrong, logp=pl.col("p_incorrect").log(), order=1),
             base.with_columns(variant=pl.lit(" far"), answer_role=pl.lit("unrelated wrong"),
                               logp=pl.col("p_incorrect").log() - 1.0 + pl.col("noise"), order=2)]
    return pl.concat(parts).sort("row", "order").select([pl.col(name).cast(dtype) for name, dtype in ANSWER_SCHEMA.items()])
