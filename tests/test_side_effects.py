"""The neutral-text probe (`sweep --neutral`): each cell's neutral_kl and neutral_ppl_ratio against two full forward
passes over the passage written in tests/reference.py, on the tiny and the real model; each cell once; resumable;
its bad input."""

from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner
from conftest import REPO, sweep, write_tiny_bank
from reference import reference_engram, reference_side_effects

from engram_eval.bank.banks import load_bank
from engram_eval.cli import cli
from engram_eval.engram.nulls import null_prefix
from engram_eval.bank.passages import DEFAULT, read_passage
from engram_eval.core.spec import Method

DEFAULT_TEXT = (REPO / "engram_eval/bank/neutral.txt").read_text(encoding="utf-8")


def null_bank(folder):
    """The tiny bank with both null prefixes among the controls (shared across layers by prefix and add)."""
    path = write_tiny_bank(folder)
    path.write_text(path.read_text().replace("controls: [stars, noise, anti]", "controls: [stars, noise, anti, ~gaussian, ~mean-token]"))
    return path


def assert_equal_reference(lm, bank_path, frame, chunks: int, injection: str, passage: str) -> int:
    bank = load_bank(bank_path)
    checked = 0
    for row in frame.iter_rows(named=True):
        if row["engram"].startswith("~"):
            engram = null_prefix(row["engram"], lm, chunks)
        else:
            engram = reference_engram(lm.model, lm.tokenizer, bank.sources[row["engram"]].text, row["layer"], k=chunks,
                                      final_norm=injection != "actadd")
        kl, ratio = reference_side_effects(lm.model, lm.tokenizer, engram, row["strength"], passage, mode=injection,
                                           layer=row["layer"])
        assert row["neutral_kl"] == pytest.approx(kl, rel=2e-3, abs=1e-5), row
        assert row["neutral_ppl_ratio"] == pytest.approx(ratio, rel=1e-4), row
        checked += 1
    return checked


@pytest.mark.parametrize("injection", ["prefix", "add", "actadd"])
def test_neutral_probe_equals_two_full_forward_passes_on_the_tiny_model(injection, tiny, tmp_path):
    bank = null_bank(tmp_path)
    result = sweep(tiny, bank, tmp_path / "run", injection=injection, layers=[0, 2, 4], strengths=[1.0, 6.0],
                   questions=["q1", "q2"], neutral=read_passage(DEFAULT))
    effects = pl.read_parquet(tmp_path / "run/side_effects.parquet")
    results = pl.read_parquet(result.results_path).filter(pl.col("role") != "baseline")
    cells = results.select("engram", "layer", "strength", "chunks").unique()
    # one row per distinct cell of the grid, however many questions share it
    assert effects.height == cells.height == 6 * 3 * 2
    assert effects.join(cells, on=["engram", "layer", "strength", "chunks"], how="anti").height == 0
    ids = tiny.tokenizer(DEFAULT_TEXT)["input_ids"]
    assert set(effects["passage_tokens"]) == {len(ids)} and set(effects["passage_sha256"]) == {read_passage(DEFAULT).sha256}
    assert set(effects["run_id"]) == {result.run["run_id"]} and set(effects["injection"]) == {injection}
    assert assert_equal_reference(tiny, bank, effects, 4, injection, DEFAULT_TEXT) == effects.height
    assert effects["neutral_kl"].min() >= 0 and effects["neutral_kl"].max() > 0.01
    record = result.run["side_effects"]
    assert record["passage"] == DEFAULT and record["tokens"] == len(ids)
    assert record["cells"] == {"total": effects.height, "resumed": 0, "computed": effects.height}
    assert result.run["timings"]["side_effects_seconds"] > 0


def test_neutral_probe_and_kl_next_equal_full_forward_passes_on_the_real_model(real, tmp_path):
    from reference import reference_steered
    import torch

    bank = null_bank(tmp_path)
    passage = tmp_path / "passage.txt"
    passage.write_text(DEFAULT_TEXT.split("\n\n")[0])
    for injection in ("prefix", "add", "actadd"):
        out = tmp_path / injection
        result = sweep(real, bank, out, injection=injection, layers=[8], strengths=[4.0], chunks=4, questions=["q1"],
                       neutral=read_passage(str(passage)))
        effects = pl.read_parquet(out / "side_effects.parquet")
        assert assert_equal_reference(real, bank, effects, 4, injection, passage.read_text()) == 6
        assert effects["neutral_ppl_ratio"].max() > 1.0
        row = pl.read_parquet(result.results_path).filter(pl.col("engram") == "topic").row(0, named=True)
        question = load_bank(bank).questions[0]
        engram = reference_engram(real.model, real.tokenizer, load_bank(bank).sources["topic"].text, 8, k=4)
        logps = []
        for vectors in (None, engram):
            with reference_steered(real.model, real.tokenizer, vectors, 4.0, question.prompt, mode=injection, layer=8) as inputs:
                with torch.no_grad():
                    logps.append(torch.log_softmax(real.model(inputs_embeds=inputs.unsqueeze(0)).logits[0, -1].float(), -1))
        kl = torch.nn.functional.kl_div(logps[1], logps[0], log_target=True, reduction="sum").item()
        assert row["kl_next"] == pytest.approx(kl, rel=2e-3, abs=1e-5)


def test_a_null_prefix_is_computed_once_for_every_layer_and_actadd_per_layer(tiny, tmp_path):
    bank = null_bank(tmp_path)
    for injection, distinct in (("prefix", 1), ("actadd", 3)):
        sweep(tiny, bank, tmp_path / injection, injection=injection, layers=[1, 2, 4], strengths=[2.0], questions=["q1"],
              neutral=read_passage(DEFAULT))
        effects = pl.read_parquet(tmp_path / injection / "side_effects.parquet")
        null = effects.filter(pl.col("engram") == "~gaussian")
        assert null.height == 3 and null["neutral_kl"].n_unique() == distinct


def test_the_probe_resumes_keeps_its_file_without_neutral_and_starts_over_on_another_passage(tiny, tiny_bank, tmp_path):
    out = tmp_path / "run"
    grid = dict(layers=[1, 2], strengths=[1.0, 3.0], questions=["q1", "q2"])
    first = sweep(tiny, tiny_bank, out, neutral=read_passage(DEFAULT), **grid)
    merged = pl.read_parquet(out / "side_effects.parquet")
    parts = sorted((out / "side-effect-parts").glob("*.parquet"))
    assert len(parts) == 4  # one per engram: topic and its three controls
    parts[1].unlink()
    again = sweep(tiny, tiny_bank, out, neutral=read_passage(DEFAULT), **grid)
    assert again.run["side_effects"]["cells"] == {"total": 16, "resumed": 12, "computed": 4}
    assert pl.read_parquet(out / "side_effects.parquet").equals(merged)
    plain = sweep(tiny, tiny_bank, out, **grid)  # no --neutral: the probe's record and file stay
    assert plain.run["side_effects"]["sha256"] == first.run["side_effects"]["sha256"]
    assert pl.read_parquet(out / "side_effects.parquet").equals(merged)
    assert plain.run["run_id"] == first.run["run_id"]
    other = tmp_path / "other.txt"
    other.write_text("The train left the station at noon and the passengers read, slept or looked out of the window.")
    warnings = []
    changed = sweep(tiny, tiny_bank, out, neutral=read_passage(str(other)), warn=warnings.append, **grid)
    assert any("another passage" in w for w in warnings)
    assert changed.run["side_effects"]["cells"]["computed"] == 16
    effects = pl.read_parquet(out / "side_effects.parquet")
    assert set(effects["passage_sha256"]) == {read_passage(str(other)).sha256}
    assert json.loads((out / "run.json").read_text())["side_effects"]["passage"] == str(other)


def cli_sweep(tiny_model_dir, bank, out, *extra):
    args = ["sweep", bank, "--model", tiny_model_dir, "--layers", "1", "--strengths", "1", "--chunks", "4", "--out", out,
            "--store", out.parent / "store", "--quiet", *extra]
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_the_cli_writes_side_effects_and_names_them_in_its_summary(tiny, tiny_model_dir, tiny_bank, tmp_path):
    result = cli_sweep(tiny_model_dir, tiny_bank, tmp_path / "run", "--neutral", "default", "--questions", "q1")
    assert result.exit_code == 0, result.output
    assert "side effects" in result.stdout and "side_effects.parquet" in result.stdout
    library = sweep(tiny, tiny_bank, tmp_path / "library", layers=[1], strengths=[1.0], chunks=4, questions=["q1"],
                    neutral=read_passage(DEFAULT))
    got = pl.read_parquet(tmp_path / "run/side_effects.parquet")
    assert got.equals(pl.read_parquet(library.out / "side_effects.parquet"))


@pytest.mark.parametrize("content,message", [
    (None, "--neutral {path}: no such file (or `default` for the bundled passage)"),
    ("  \n", "--neutral {path}: the file is empty"),
    ("A short line.", "--neutral {path}: the passage has {n} tokens; the probe needs at least 16"),
])
def test_bad_neutral_passages_are_one_line_and_write_nothing(content, message, tiny, tiny_model_dir, tiny_bank, tmp_path):
    path = tmp_path / "passage.txt"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "run"
    result = cli_sweep(tiny_model_dir, tiny_bank, out, "--neutral", path)
    n = len(tiny.tokenizer(content or "")["input_ids"])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {message.format(path=path, n=n)}\n" and "Traceback" not in result.output
    assert not out.exists()


def test_add_injection_needs_a_passage_of_k_tokens(tiny):
    from engram_eval.core.errors import EngramEvalError
    from engram_eval.bank.passages import NeutralPassage
    from engram_eval.steer.side_effects import passage_ids

    passage = NeutralPassage("p.txt", DEFAULT_TEXT.split(".")[0])
    n = len(tiny.tokenizer(passage.text)["input_ids"])
    assert n >= 16 and passage_ids(tiny, passage, Method("add"), [n]) == tuple(tiny.tokenizer(passage.text)["input_ids"])
    with pytest.raises(EngramEvalError, match=rf"^--neutral p.txt: the passage has {n} tokens; --injection add with k = "
                                              rf"{n + 1} needs at least {n + 1}$"):
        passage_ids(tiny, passage, Method("add"), [n + 1])
    assert passage_ids(tiny, passage, Method("prefix"), [n + 1])


def test_the_report_takes_its_doses_from_the_probe_and_refuses_a_changed_file(tiny, tiny_bank, tmp_path):
    out = tmp_path / "run"
    sweep(tiny, tiny_bank, out, layers=[1, 2], strengths=[1.0, 3.0, 9.0], neutral=read_passage(DEFAULT))
    result = CliRunner().invoke(cli, ["report", str(out), "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    dose = json.loads(result.stdout)["dose_matched"]
    assert dose["dose"] == "neutral_kl"
    effects = pl.read_parquet(out / "side_effects.parquet")
    results = pl.read_parquet(out / "results.parquet").filter(pl.col("role") != "baseline")
    kinds = results.select("engram", kind=pl.coalesce("control_kind", "role")).unique()
    for row in dose["side_effects"]:  # the table: medians over each kind's distinct cells, recomputed from the file
        cells = effects.join(kinds.filter(pl.col("kind") == row["kind"]), on="engram").filter(
            (pl.col("layer") == row["layer"]) & (pl.col("strength") == row["strength"]))
        assert row["cells"] == cells.height
        assert row["neutral_kl"] == pytest.approx(cells["neutral_kl"].median())
        assert row["neutral_ppl_ratio"] == pytest.approx(cells["neutral_ppl_ratio"].median())
    data = bytearray((out / "side_effects.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "side_effects.parquet").write_bytes(bytes(data))
    refused = CliRunner().invoke(cli, ["report", str(out)], catch_exceptions=False)
    assert refused.exit_code == 2 and refused.stderr.startswith(f"error: {out / 'side_effects.parquet'}: checksum mismatch")
    assert refused.stderr.count("\n") == 1
