"""The embedded models on their real weights: the engram scale and the BOS placement measured through each, and one
sweep on a held-out bank (capitals: two questions this code was never tuned on) against a plain computation written
here: the embedding module's output for the prompt, the engram's chunk means from forward hooks, scaled to the norm
real tokens have at the first block's input (measured with a pre-hook that stops there), put right after the BOS the
tokenizer put first, one full forward pass, a float32 softmax."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

from conftest import REPO, sweep
from engram_eval.backend.model import load_model
from reference import reference_chunks

pytestmark = pytest.mark.real_model

QUESTIONS = ["capital_at", "capital_au"]
LAYER = {"smollm2-135m": 16, "gemma3-270m": 9}
STRENGTHS = [1.0, 5.0]


@pytest.fixture(scope="module", params=list(LAYER))
def embedded(request, real):
    """(alias, the loaded model); Gemma's first load dequantizes its GGUF into the cache (about a minute)."""
    return request.param, real if request.param == "smollm2-135m" else load_model(request.param, device="cpu")


class Reached(Exception):
    pass


def blocks(model) -> torch.nn.ModuleList:
    return model.model.layers


@torch.no_grad()
def first_block_input(model, **inputs) -> torch.Tensor:
    """What block 0 receives, [batch, positions, hidden]; the pass stops there."""
    seen = []

    def stop(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])
        raise Reached

    handle = blocks(model)[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(**inputs)
    except Reached:
        pass
    finally:
        handle.remove()
    return seen[0].float()


def plain_token_norm(model) -> float:
    """The norm real tokens have at block 0 (what a zero input gets there taken away), over the gain from inputs_embeds."""
    weight = model.get_input_embeddings().weight.detach()
    zero = first_block_input(model, inputs_embeds=torch.zeros(1, 1, weight.shape[1]))[0, 0]
    arrive, through = [], []
    for start in range(0, weight.shape[0], 16384):
        ids = torch.arange(start, min(weight.shape[0], start + 16384))
        arrive.append((first_block_input(model, input_ids=ids[:, None])[:, 0] - zero).norm(dim=1))
        through.append((first_block_input(model, inputs_embeds=weight[ids][:, None, :])[:, 0] - zero).norm(dim=1))
    gain = torch.cat(through).mean() / weight.float().norm(dim=1).mean()
    return (torch.cat(arrive).mean() / gain).item()


@torch.no_grad()
def plain_cell(model, tokenizer, prompt: str, source: str, layer: int, strength: float, token_norm: float,
               correct: list[str], incorrect: list[str]) -> tuple[float, float]:
    seen = []
    handle = blocks(model)[layer - 1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        model(input_ids=torch.tensor([tokenizer(source)["input_ids"]]))
    finally:
        handle.remove()
    engram = reference_chunks(seen[0][0].float(), 16)
    scaled = engram * (token_norm / engram.norm(dim=1).mean()) * strength
    ids = tokenizer(prompt)["input_ids"]
    embedded = model.get_input_embeddings()(torch.tensor(ids)).float()
    start = 1 if ids[0] == tokenizer.bos_token_id and tokenizer(prompt, add_special_tokens=False)["input_ids"][0] != ids[0] else 0
    inputs = torch.cat([embedded[:start], scaled, embedded[start:]])
    probs = torch.softmax(model(inputs_embeds=inputs.unsqueeze(0)).logits[0, -1].float(), dim=-1)
    first = lambda v: tokenizer.encode(v, add_special_tokens=False)[0]  # noqa: E731
    return max(probs[first(v)].item() for v in correct), max(probs[first(v)].item() for v in incorrect)


def test_the_scale_and_the_bos_as_each_embedded_model_receives_them(embedded):
    alias, lm = embedded
    weight_norm = lm.model.get_input_embeddings().weight.float().norm(dim=1).mean().item()
    assert lm.embedding_norm == pytest.approx(plain_token_norm(lm.model), rel=1e-5)
    if alias == "smollm2-135m":  # nothing between the embedding and block 0: the seeds' rule, to the bit; no BOS added
        assert lm.embedding_norm == weight_norm and not lm.adds_bos
    else:  # Gemma's module multiplies by sqrt(640) ~ 25.3: about 26.1 where the weight's rows have about 1.03
        assert lm.embedding_norm == pytest.approx(weight_norm * 640 ** 0.5, rel=1e-3) and 25 < lm.embedding_norm < 27
        assert lm.adds_bos and lm.tokenizer.bos_token == "<bos>"


def test_a_held_out_sweep_scores_what_the_plain_computation_scores(embedded, tmp_path):
    from engram_eval.bank.banks import load_bank

    alias, lm = embedded
    layer = LAYER[alias]
    result = sweep(lm, REPO / "questions/capitals.yaml", tmp_path / "run", layers=[layer], strengths=STRENGTHS, chunks=16,
                   questions=QUESTIONS)
    run = json.loads((result.out / "run.json").read_text())
    assert run["embedding_scale"]["token_norm"] == pytest.approx(lm.embedding_norm, rel=1e-9)
    assert run["prefix_placement"] == {"prefix_at": "after-bos", "tokenizer_adds_bos": alias == "gemma3-270m",
                                       "bos_token": "<bos>" if alias == "gemma3-270m" else None}
    assert run["model_spec"] == lm.spec
    rows = pl.read_parquet(result.results_path).filter(pl.col("role") == "relevant")
    bank = load_bank(REPO / "questions/capitals.yaml")
    token_norm = plain_token_norm(lm.model)
    for row in rows.iter_rows(named=True):
        question = next(q for q in bank.questions if q.id == row["question_id"])
        expected = plain_cell(lm.model, lm.tokenizer, question.prompt, bank.sources[question.engram].text, layer,
                              row["strength"], token_norm, list(question.correct), list(question.incorrect))
        assert (row["p_correct"], row["p_incorrect"]) == pytest.approx(expected, rel=1e-4, abs=1e-8), (alias, row["question_id"])


def test_engram_eval_models_lists_what_each_model_is(embedded):
    """The table `engram-eval models` prints (read from package metadata, no weights) against the loaded model."""
    from click.testing import CliRunner

    from engram_eval.backend.embedded import EMBEDDED_MODELS
    from engram_eval.cli import cli

    alias, lm = embedded
    listed = EMBEDDED_MODELS[alias]
    assert (listed.layers, listed.hidden_size, listed.architecture) == (lm.num_layers, lm.hidden_size, lm.model.config.model_type
                                                                         .removesuffix("_text"))
    assert listed.chat == bool(lm.tokenizer.chat_template) and listed.installed
    result = CliRunner().invoke(cli, ["models"])
    row = next(line for line in result.stdout.splitlines() if alias in line)
    assert all(str(value) in row for value in (listed.layers, listed.hidden_size, "chat" if listed.chat else "base", "yes"))
    assert listed.install in row
