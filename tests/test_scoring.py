import math

import polars as pl
import pytest
import torch

import engram_eval.steer.scoring as scoring_module
from engram_eval.bank.banks import load_bank
from conftest import assert_same_results, sweep, write_tiny_bank
from reference import reference_engram


def test_batched_equals_unbatched(tiny, tiny_bank, tmp_path):
    one = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "one", batch_size=1).results_path)
    auto = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "auto").results_path)
    three = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "three", batch_size=3).results_path)
    for other in (auto, three):
        assert_same_results(other, one)


def test_batches_are_split_evenly_so_no_small_remainder_batch_runs(tiny, tiny_bank, tmp_path, monkeypatch):
    real = scoring_module.variant_logprobs
    sizes = []

    def recording(lm, steering, *args):
        sizes.append(0 if steering is None else steering.vectors.shape[0])
        return real(lm, steering, *args)

    monkeypatch.setattr(scoring_module, "variant_logprobs", recording)
    result = sweep(tiny, tiny_bank, tmp_path / "run", batch_size=5)
    questions = result.run["cells"]["questions"]
    assert sizes == [0, 4, 4, 4, 4] * questions  # 16 cells per question at most 5 at a time: 4 x 4, not 5 + 5 + 5 + 1


@pytest.mark.parametrize("scoring", ["sequence", "sequence-max", "sequence-mean"])
def test_sequence_scorings_combine_each_variants_token_log_probs(scoring, tiny, tmp_path):
    multi_token = {"q1": ("The first medication for the tumor should be", [" alpha", " phenoxybenzamine"], [" beta", " metoprolol tartrate"])}
    bank_path = write_tiny_bank(tmp_path, multi_token)
    frame = pl.read_parquet(sweep(tiny, bank_path, tmp_path / "run", scoring=scoring, layers=[2], strengths=[2.0]).results_path)
    bank = load_bank(bank_path)
    row = frame.filter((pl.col("question_id") == "q1") & (pl.col("engram") == "topic")).row(0, named=True)
    q = bank.questions[0]
    engram = reference_engram(tiny.model, tiny.tokenizer, bank.sources["topic"].text, 2, k=4)
    table = tiny.model.get_input_embeddings().weight
    prefix = engram * (table.norm(dim=1).mean() / engram.norm(dim=1).mean()) * 2.0

    def token_logprobs(variant):
        ids = tiny.tokenizer(q.prompt)["input_ids"]
        tail = tiny.tokenizer.encode(variant, add_special_tokens=False)
        with torch.no_grad():
            logits = tiny.model(inputs_embeds=torch.cat([prefix, table[ids + tail]]).unsqueeze(0)).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        start = prefix.shape[0] + len(ids) - 1
        return [logp[start + j, t].item() for j, t in enumerate(tail)]

    def side(variants):
        per_variant = [token_logprobs(v) for v in variants]
        if scoring == "sequence":
            return math.log(sum(math.exp(sum(lps)) for lps in per_variant))
        return max(sum(lps) / (len(lps) if scoring == "sequence-mean" else 1) for lps in per_variant)

    assert any(len(tiny.tokenizer.encode(v, add_special_tokens=False)) > 1 for v in q.correct + q.incorrect)
    assert math.log(row["p_correct"]) == pytest.approx(side(q.correct), abs=1e-4)
    assert math.log(row["p_incorrect"]) == pytest.approx(side(q.incorrect), abs=1e-4)


def test_out_of_memory_backs_off_and_gives_identical_results(tiny, tiny_bank, tmp_path, monkeypatch):
    reference = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "ref", batch_size=1).results_path)
    real = scoring_module.variant_logprobs
    sizes = []

    def small_memory(lm, steering, *args):
        if steering is not None:
            sizes.append(steering.vectors.shape[0])
            if steering.vectors.shape[0] > 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(lm, steering, *args)

    monkeypatch.setattr(scoring_module, "variant_logprobs", small_memory)
    frame = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "oom", batch_size=16).results_path)
    assert sizes[:4] == [16, 8, 4, 2] and max(sizes[3:]) == 2  # halves until it fits, then keeps that size
    assert_same_results(frame, reference)


@pytest.mark.parametrize("injection", ["prefix", "actadd"])
def test_recorded_attention_shares_equal_output_attentions(tiny, tiny_bank, tmp_path, injection):
    from reference import reference_steered

    before = tiny.model.config._attn_implementation
    result = sweep(tiny, tiny_bank, tmp_path / "run", record_attention=True, injection=injection, layers=[2, 4],
                   strengths=[1.0, 5.0], questions=["q1"])
    assert tiny.model.config._attn_implementation == before  # restored after the sweep
    frame = pl.read_parquet(result.results_path)
    bank = load_bank(tiny_bank)
    q = bank.questions[0]
    tiny.model.set_attn_implementation("eager")
    try:
        for row in frame.iter_rows(named=True):
            engram = None if row["engram"] is None else reference_engram(tiny.model, tiny.tokenizer, bank.sources[row["engram"]].text, row["layer"], k=4,
                                                                         final_norm=injection != "actadd")
            with reference_steered(tiny.model, tiny.tokenizer, engram, row["strength"], q.prompt, mode=injection, layer=row["layer"]) as inputs:
                with torch.no_grad():
                    attentions = tiny.model(inputs_embeds=inputs.unsqueeze(0), output_attentions=True).attentions
            last = torch.stack([a[0, :, -1, :] for a in attentions]).mean(dim=(0, 1))  # layers and heads
            assert row["attn_prefix_share"] == pytest.approx(last[:4].sum().item(), rel=1e-5)
            assert row["attn_first_share"] == pytest.approx(last[0].item(), rel=1e-5)
    finally:
        tiny.model.set_attn_implementation(before)
    unrecorded = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "plain", layers=[2], strengths=[1.0], questions=["q1"]).results_path)
    assert unrecorded["attn_prefix_share"].null_count() == unrecorded.height


@pytest.mark.parametrize("scoring,injection", [("first-token", "prefix"), ("sequence", "prefix"), ("first-token", "actadd"),
                                               ("sequence-mean", "add")])
def test_kl_next_and_entropy_next_equal_two_full_forward_passes(scoring, injection, tiny, tiny_bank, tmp_path):
    from reference import reference_steered

    frame = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "run", scoring=scoring, injection=injection, layers=[2, 4],
                                  strengths=[1.0, 6.0], questions=["q1"]).results_path)
    bank = load_bank(tiny_bank)
    q = bank.questions[0]

    def next_logp(engram, strength, layer):
        with reference_steered(tiny.model, tiny.tokenizer, engram, strength, q.prompt, mode=injection, layer=layer) as inputs:
            with torch.no_grad():
                return torch.log_softmax(tiny.model(inputs_embeds=inputs.unsqueeze(0)).logits[0, -1].float(), dim=-1)

    baseline = next_logp(None, 0.0, None)
    checked = 0
    for row in frame.iter_rows(named=True):
        if row["engram"] is None:
            assert row["kl_next"] == 0.0
            logp = baseline
        else:
            engram = None if row["engram"].startswith("~") else reference_engram(tiny.model, tiny.tokenizer,
                                                                                 bank.sources[row["engram"]].text, row["layer"], k=4,
                                                                                 final_norm=injection != "actadd")
            if engram is None:
                continue  # null prefixes have their own tests; the sources' engrams are the independent computation here
            logp = next_logp(engram, row["strength"], row["layer"])
            kl = torch.nn.functional.kl_div(logp, baseline, log_target=True, reduction="sum").item()
            assert row["kl_next"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
            checked += 1
        assert row["entropy_next"] == pytest.approx(-(logp.exp() * logp).sum().item(), rel=1e-4)
    assert checked >= 8 and frame.filter(pl.col("role") != "baseline")["kl_next"].max() > 0.01
