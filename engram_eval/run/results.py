"""Results: the results.parquet schema, the calibration cases, and one question's rows as a frame."""

from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

from ..bank.banks import Bank
from ..core.errors import EngramEvalError

if TYPE_CHECKING:
    from ..steer.grid import Cell
    from ..steer.prompts import PreparedQuestion
    from .settings import SweepSettings

CASES = (
    "HIGH_CONFIDENCE_CORRECT",
    "CORRECT_WEAKENED",
    "FRAGILE_CORRECT",
    "HIGH_CONFIDENCE_INCORRECT",
    "RECOVERED_KNOWLEDGE",
    "TIE",
    "UNSCORABLE",
)

# A cell whose p_correct + p_incorrect fell below this share of the question's baseline mass has "collapsed": the
# engram moved the probability to other tokens, so its ratio compares two vanishing numbers (docs/results.md).
COLLAPSE_THRESHOLD = 0.1

# A cell's settings: the columns results.parquet and generations.parquet share, in this order.
CELL_SETTING_COLUMNS = {
    "layer": pl.Int32,
    "strength": pl.Float64,
    "chunks": pl.Int32,
    "pooling": pl.String,
    "skip_tokens": pl.Int32,
    "window": pl.Int32,
    "scaling": pl.String,
    "injection": pl.String,
    "positions": pl.String,
    "prefix_at": pl.String,
    "context": pl.Boolean,
}

RESULT_SCHEMA = pl.Schema(
    {
        "run_id": pl.String,
        "model": pl.String,
        "model_fingerprint": pl.String,
        "bank": pl.String,
        "question_id": pl.String,
        "tags": pl.List(pl.String),
        "related_wrong": pl.Boolean,
        "engram": pl.String,
        "engram_key": pl.String,
        "role": pl.String,
        "control_kind": pl.String,
        "paraphrase": pl.Int32,
        "sample": pl.Int32,
        **CELL_SETTING_COLUMNS,
        "repeated": pl.Boolean,
        "scoring": pl.String,
        "p_correct": pl.Float64,
        "p_incorrect": pl.Float64,
        "mass": pl.Float64,
        "mass_ratio": pl.Float64,
        "collapsed": pl.Boolean,
        "p_correct_rose": pl.Boolean,
        "top_token": pl.String,
        "p_top": pl.Float64,
        "kl_next": pl.Float32,
        "entropy_next": pl.Float32,
        "attn_prefix_share": pl.Float64,
        "attn_first_share": pl.Float64,
        "log_ratio": pl.Float64,
        "ratio": pl.Float64,
        "baseline_ratio": pl.Float64,
        "improvement": pl.Float64,
        "log_improvement": pl.Float64,
        "correct_before": pl.Boolean,
        "correct_after": pl.Boolean,
        "flipped": pl.Boolean,
        "broken": pl.Boolean,
        "case": pl.String,
        "top_correct_variant": pl.String,
        "top_incorrect_variant": pl.String,
    }
)


# A part file's rows carry, beside RESULT_SCHEMA, every answer variant's log-probability (first-token or sequence, per
# the scoring) with its text and role; the merge writes them out as RUN/answers.parquet, one row per (cell, variant),
# and leaves results.parquet as it always was.
ANSWER_LISTS = {"answer_variants": pl.List(pl.String), "answer_roles": pl.List(pl.String), "answer_logps": pl.List(pl.Float64)}
PART_SCHEMA = pl.Schema({**RESULT_SCHEMA, **ANSWER_LISTS})
ANSWER_ROLES = ("correct", "related wrong", "unrelated wrong", "other")
ANSWER_KEYS = ("run_id", "question_id", "context", "engram", "role", "control_kind", "paraphrase", "sample", "layer",
               "strength", "chunks", "repeated", "scoring")
ANSWER_SCHEMA = pl.Schema({**{key: RESULT_SCHEMA[key] for key in ANSWER_KEYS}, "variant": pl.String,
                           "answer_role": pl.String, "logp": pl.Float64})


def answer_rows(parts: pl.LazyFrame) -> pl.LazyFrame:
    """Part rows -> one row per cell and answer variant: the cell's keys, the variant, its role, its log-probability."""
    return (parts.select(*ANSWER_KEYS, *ANSWER_LISTS).explode(list(ANSWER_LISTS))
            .rename({"answer_variants": "variant", "answer_roles": "answer_role", "answer_logps": "logp"})
            .select([pl.col(name).cast(dtype) for name, dtype in ANSWER_SCHEMA.items()]))


def primary_rows() -> pl.Expr:
    """Rows of the run's grid itself: not another paraphrase's or a sample's (`files: [...]`, `--sample`), which sit
    beside their source's own rows (paraphrase 0) and are read only by the variability section."""
    return pl.col("sample").is_null() & (pl.col("paraphrase").is_null() | (pl.col("paraphrase") == 0))


def condition_label() -> pl.Expr:
    """A question run with and without its retrieved context is two units of analysis, labelled as such:
    `capital_france +context`, `capital_france -context` (questions without a context keep their id)."""
    suffix = pl.when(pl.col("context")).then(pl.lit(" +context")).otherwise(pl.lit(" -context"))
    return (pl.when(pl.col("context").is_null()).then(pl.col("question_id"))
            .otherwise(pl.col("question_id") + suffix).alias("question_id"))


def computed_cells() -> pl.Expr:
    """Rows that are not a repeat of another cell's computation (count and show each computed cell once)."""
    return ~pl.col("repeated")


OFF_DISTRIBUTION_MASS = 0.1  # the answers' variants together hold less of the baseline's next-token probability


def off_distribution(frame: pl.DataFrame, end_tokens: set[str]) -> dict[str, str]:
    """Baseline rows whose answers the model is not about to say -> why, by question (`id +context` / `id -context`
    per condition): all answer variants together under OFF_DISTRIBUTION_MASS of the probability, or an end-of-turn
    or end-of-text token on top (an imported bank whose prompt ends where the chat template expects the turn to)."""
    found = {}
    for row in frame.filter(pl.col("role") == "baseline").sort("question_id").iter_rows(named=True):
        label = row["question_id"] + ("" if row["context"] is None else " +context" if row["context"] else " -context")
        if why := off_distribution_reason(row["mass"], row["top_token"], row["p_top"], end_tokens):
            found[label] = why
    return found


def off_distribution_reason(mass: float, top_token: str, p_top: float, end_tokens: set[str]) -> str | None:
    """Why one baseline's answers are off-distribution, or None (the rule `off_distribution` applies per row)."""
    reasons = []
    if mass < OFF_DISTRIBUTION_MASS:
        reasons.append(f"its answers hold {100 * mass:.1f}% of the probability")
    if top_token in end_tokens:
        reasons.append(f"the top token is {top_token!r} (end of turn or text) at p {p_top:.2f}")
    return " and ".join(reasons) or None


def off_distribution_warning(bank_path: object, off: dict[str, str], questions: int, shown: int = 3) -> str:
    """One line for every off-distribution question: how many, the first few and why."""
    named = "; ".join(f"'{q}' ({why})" for q, why in list(off.items())[:shown])
    more = f" and {len(off) - shown} more" if len(off) > shown else ""
    return (f"{bank_path}: {len(off)} of {questions} question(s) have their answers off-distribution at baseline: {named}{more} "
            f"(the report marks them; a prompt the model does not answer in words measures noise)")


PROBABILITY_COLUMNS = ("p_correct", "p_incorrect", "mass", "p_top")


def check_finite(frame: pl.DataFrame, question_id: str) -> None:
    """A question whose scores hold a NaN or infinite probability failed: it is never a case (UNSCORABLE is for
    answers the scoring cannot tell apart, not for an overflowing model)."""
    bad = frame.filter(pl.any_horizontal([~pl.col(c).is_finite() for c in PROBABILITY_COLUMNS if c in frame.columns]))
    if bad.height:
        row = bad.row(0, named=True)
        where = ("the baseline" if row["role"] == "baseline" else
                 f"engram {row['engram']} layer {row['layer']} strength {row['strength']:g} k {row['chunks']}")
        raise EngramEvalError(f"question '{question_id}': {bad.height} row(s) have non-finite probabilities, the first at "
                              f"{where} (the steered activations overflow the model's dtype; lower --strengths)")


def case_expr() -> pl.Expr:
    """METHOD.md's calibration cases from (baseline_ratio, ratio); ties and unscorable cells are their own cases."""
    b, r = pl.col("baseline_ratio"), pl.col("ratio")
    unscorable = ~(b.is_finite() & r.is_finite() & (b > 0) & (r > 0))
    return (
        pl.when(pl.col("role") == "baseline").then(None)
        .when(unscorable).then(pl.lit("UNSCORABLE"))
        .when((b == 1) | (r == 1)).then(pl.lit("TIE"))
        .when((b > 1) & (r > b)).then(pl.lit("HIGH_CONFIDENCE_CORRECT"))
        .when((b > 1) & (r >= 1)).then(pl.lit("CORRECT_WEAKENED"))
        .when(b > 1).then(pl.lit("FRAGILE_CORRECT"))
        .when(r < 1).then(pl.lit("HIGH_CONFIDENCE_INCORRECT"))
        .otherwise(pl.lit("RECOVERED_KNOWLEDGE"))
    )


def engram_kind() -> pl.Expr:
    """A row's kind of engram as one column: a control's kind (anti, irrelevant, random, null-prefix), else its role
    (relevant, baseline)."""
    return pl.coalesce(pl.col("control_kind"), pl.col("role")).alias("kind")


def question_frame(settings: SweepSettings, bank: Bank, prepared: PreparedQuestion, cells: list[Cell], scores: dict[str, list]) -> pl.DataFrame:
    question = prepared.question
    n = len(cells) + 1
    raw = pl.DataFrame(
        {
            "run_id": [settings.run_id] * n,
            "model": [settings.model] * n,
            "model_fingerprint": [settings.model_fingerprint] * n,
            "bank": [bank.name] * n,
            "question_id": [question.id] * n,
            "tags": [list(question.tags)] * n,
            "related_wrong": [question.related_wrong] * n,
            "engram": [None] + [c.engram for c in cells],
            "engram_key": [None] + [c.engram_key for c in cells],
            "role": ["baseline"] + [c.role for c in cells],
            "control_kind": [None] + [c.control_kind for c in cells],
            "paraphrase": [None] + [c.paraphrase for c in cells],
            "sample": [None] + [c.sample for c in cells],
            "layer": [None] + [c.layer for c in cells],
            "strength": [None] + [c.strength for c in cells],
            "chunks": [settings.chunk_list[0] if len(settings.chunk_list) == 1 else None] + [c.chunks for c in cells],
            "pooling": [settings.extraction.pooling] * n,
            "skip_tokens": [settings.extraction.skip_tokens] * n,
            "window": [settings.extraction.window] * n,
            "scaling": [settings.method.scaling] * n,
            "injection": [settings.method.injection] * n,
            "positions": [settings.method.positions] * n,
            "prefix_at": [settings.method.prefix_at] * n,
            "context": [prepared.context] * n,
            "scoring": [settings.method.scoring] * n,
            "repeated": scores["repeated"],
            "logp_correct": scores["logp_correct"],
            "logp_incorrect": scores["logp_incorrect"],
            "top_correct_variant": scores["top_correct"],
            "top_incorrect_variant": scores["top_incorrect"],
            "top_token": scores["top_token"],
            "logp_top": scores["logp_top"],
            "kl_next": scores["kl_next"],
            "entropy_next": scores["entropy_next"],
            "attn_prefix_share": scores["attn_prefix_share"],
            "attn_first_share": scores["attn_first_share"],
            "answer_variants": [[text for text, _, _ in prepared.answers]] * n,
            "answer_roles": [[role for _, role, _ in prepared.answers]] * n,
            "answer_logps": scores["answer_logps"],
        },
        schema_overrides={k: RESULT_SCHEMA[k] for k in ("tags", "related_wrong", "engram", "engram_key", "control_kind",
                                                      "paraphrase", "sample", "layer", "strength",
                                                      "chunks", "skip_tokens", "window", "context", "attn_prefix_share",
                                                      "attn_first_share")},
    )
    log_ratio = pl.col("logp_correct") - pl.col("logp_incorrect")
    unscorable = pl.col("case") == "UNSCORABLE"
    frame = (
        raw.with_columns(
            p_correct=pl.col("logp_correct").exp(),
            p_incorrect=pl.col("logp_incorrect").exp(),
            p_top=pl.col("logp_top").exp(),
            log_ratio=log_ratio,
            ratio=log_ratio.exp(),
        )
        .with_columns(mass=pl.col("p_correct") + pl.col("p_incorrect"))
        .with_columns(
            baseline_ratio=pl.col("ratio").first(),
            baseline_log_ratio=pl.col("log_ratio").first(),
            mass_ratio=pl.col("mass") / pl.col("mass").first(),
            p_correct_rose=pl.when(pl.col("role") != "baseline").then(pl.col("p_correct") > pl.col("p_correct").first()),
        )
        .with_columns(collapsed=pl.col("mass_ratio") < COLLAPSE_THRESHOLD)
        .with_columns(
            improvement=(pl.col("log_ratio") - pl.col("baseline_log_ratio")).exp(),
            log_improvement=pl.col("log_ratio") - pl.col("baseline_log_ratio"),
            correct_before=pl.col("baseline_ratio") > 1,
            correct_after=pl.col("ratio") > 1,
            case=case_expr(),
        )
        .with_columns(
            flipped=(pl.col("baseline_ratio") < 1) & (pl.col("ratio") > 1) & unscorable.not_().fill_null(True),
            broken=(pl.col("baseline_ratio") > 1) & (pl.col("ratio") < 1) & unscorable.not_().fill_null(True),
        )
    )
    return frame.select([pl.col(name).cast(dtype) for name, dtype in PART_SCHEMA.items()])
