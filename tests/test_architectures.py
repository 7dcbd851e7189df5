"""Architectures that differ where it runs silently wrong, each a tiny random-init model from transformers' own config,
against a plain computation written here (forward hooks, the embedding module's output, inputs_embeds concatenation):

- Llama (BOS first), Qwen2 (no BOS), Gemma 3 (the embedding module multiplies by sqrt(hidden); sliding-window layers;
  BOS first), GPT-2 (learned positions added after inputs_embeds; no BOS), Granite (embedding_multiplier applied to
  inputs_embeds inside the model, to tokens and prefix alike; BOS first).

Per architecture: the hidden states extracted at layer L; the norm the prefix has at the first block's input against
real tokens there (strength times theirs); the BOS staying first; one cell of prefix, add and actadd scores."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
import torch

from conftest import TINY_QUESTIONS, TINY_SOURCES, _corpus, sweep, write_tiny_bank
from engram_eval.backend.model import load_model
from reference import reference_chunks

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, initializer_range=0.3)
LAYER, K, STRENGTH = 2, 4, 3.0


def config_of(name: str, vocab: int):
    from transformers import GPT2Config, Gemma3TextConfig, GraniteConfig, LlamaConfig, Qwen2Config

    if name == "llama":
        return LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **SIZES)
    if name == "qwen2":
        return Qwen2Config(vocab_size=vocab, **SIZES)
    if name == "gemma3":
        return Gemma3TextConfig(vocab_size=vocab, head_dim=8, sliding_window=6, final_logit_softcapping=30.0,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                                **SIZES)
    if name == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, n_positions=256, initializer_range=0.3)
    return GraniteConfig(vocab_size=vocab, embedding_multiplier=12.0, residual_multiplier=0.5, attention_multiplier=0.125,
                         logits_scaling=4.0, **SIZES)


ARCHITECTURES = {"llama": True, "qwen2": False, "gemma3": True, "gpt2": False, "granite": True}  # -> tokenizer adds BOS


def tokenizer_of(adds_bos: bool):
    """The tiny byte-level BPE of conftest with a <bos> token; the tokenizer puts it first only when adds_bos (SmolLM2's
    and Qwen's define a bos_token they never add)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|end|>", "<bos>"])
    backend.train_from_iterator(_corpus(), trainer)
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", backend.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", bos_token="<bos>")


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    name = request.param
    tokenizer = tokenizer_of(ARCHITECTURES[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_of(name, len(tokenizer)))
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return name, load_model(str(folder), device="cpu")


# --- the plain computation -------------------------------------------------------------------------------------------

def blocks(model) -> torch.nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@torch.no_grad()
def first_block_input(model, **inputs) -> torch.Tensor:
    """What block 0 receives for these inputs: [batch, positions, hidden] (a pre-hook, the whole model run)."""
    seen = []
    handle = blocks(model)[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return seen[0].float()


def position_terms(model, n: int) -> torch.Tensor:
    """[n, hidden]: what block 0 receives at each position for an all-zero inputs_embeds (GPT-2: its learned positions)."""
    return first_block_input(model, inputs_embeds=torch.zeros(1, n, model.config.hidden_size))[0]


def plain_token_norm(model) -> tuple[float, float]:
    """(the norm a prefix row needs, the mean norm real tokens arrive with at block 0), over the whole vocabulary."""
    weight = model.get_input_embeddings().weight.detach()
    zero = position_terms(model, 1)[0]
    ids = torch.arange(weight.shape[0])
    arrive = (first_block_input(model, input_ids=ids[:, None])[:, 0] - zero).norm(dim=1).mean()
    through = (first_block_input(model, inputs_embeds=weight[:, None, :])[:, 0] - zero).norm(dim=1).mean()
    gain = through / weight.float().norm(dim=1).mean()
    return (arrive / gain).item(), arrive.item()


@torch.no_grad()
def plain_states(model, ids: list[int], layer: int) -> torch.Tensor:
    """hidden_states[layer] (0 < layer < depth): block layer-1's output, by a forward hook."""
    seen = []
    handle = blocks(model)[layer - 1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen[0][0].float()


@torch.no_grad()
def plain_cell(model, tokenizer, mode: str, prompt: str, correct: list[str], incorrect: list[str], engram: torch.Tensor,
               token_norm: float, adds_bos: bool) -> tuple[float, float]:
    """(p_correct, p_incorrect) of one cell: the embedding module's output for the prompt, the engram scaled to
    token_norm x strength (prefix: inserted after the BOS the tokenizer put first; add: added to the k positions after
    it; actadd: strength x s x u added to block LAYER-1's output by a hook), one full forward pass, float32 softmax."""
    ids = tokenizer(prompt)["input_ids"]
    embedded = model.get_input_embeddings()(torch.tensor(ids)).float()
    scaled = engram * (token_norm / engram.norm(dim=1).mean()) * STRENGTH
    start = 1 if adds_bos else 0
    handle = None
    if mode == "prefix":
        inputs = torch.cat([embedded[:start], scaled, embedded[start:]])
    elif mode == "add":
        inputs = embedded.clone()
        inputs[start:start + K] += scaled
    else:
        s = plain_states(model, ids, LAYER).norm(dim=1).mean()
        mean = engram.mean(dim=0)
        vector = STRENGTH * s * mean / mean.norm()
        inputs = embedded

        def add(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            return (hidden + vector, *output[1:]) if isinstance(output, tuple) else hidden + vector

        handle = blocks(model)[LAYER - 1].register_forward_hook(add)
    try:
        logits = model(inputs_embeds=inputs.unsqueeze(0)).logits[0, -1].float()
    finally:
        if handle is not None:
            handle.remove()
    probs = torch.softmax(logits, dim=-1)
    first = lambda v: tokenizer.encode(v, add_special_tokens=False)[0]  # noqa: E731
    return max(probs[first(v)].item() for v in correct), max(probs[first(v)].item() for v in incorrect)


# --- the tests -------------------------------------------------------------------------------------------------------

def test_the_tokenizer_puts_bos_first_where_the_architecture_does(arch):
    name, lm = arch
    assert lm.adds_bos == ARCHITECTURES[name]
    ids = lm.tokenizer("The antidote is")["input_ids"]
    assert (ids[0] == lm.tokenizer.bos_token_id) == ARCHITECTURES[name]


def test_the_extracted_hidden_states_at_layer_l_are_the_blocks_output(arch):
    from engram_eval.core.spec import Extraction
    from engram_eval.engram.extraction import extract_engram

    name, lm = arch
    ids = lm.tokenizer(TINY_SOURCES["topic"])["input_ids"]
    engram = extract_engram(lm, TINY_SOURCES["topic"], layers=[LAYER], chunks=K, extraction=Extraction())
    expected = reference_chunks(plain_states(lm.model, ids, LAYER), K)
    assert torch.allclose(engram.layers[LAYER], expected, rtol=1e-4, atol=1e-5), name


def test_the_scale_is_what_real_tokens_have_at_the_first_block(arch):
    """The measured engram scale is the plain one, and the conventions it accounts for hold: Gemma's module multiplies
    by sqrt(hidden), Granite's multiplier is not counted twice, GPT-2's positions are left out."""
    name, lm = arch
    token_norm, _ = plain_token_norm(lm.model)
    weight_norm = lm.model.get_input_embeddings().weight.float().norm(dim=1).mean().item()
    assert lm.embedding_norm == pytest.approx(token_norm, rel=1e-5), name
    expected_factor = math.sqrt(lm.hidden_size) if name == "gemma3" else 1.0
    assert lm.embedding_scale.token_to_weight == pytest.approx(expected_factor, rel=1e-4), name
    assert lm.embedding_scale.gain == pytest.approx(12.0 if name == "granite" else 1.0, rel=1e-4), name
    assert lm.embedding_scale.weight_row_norm == pytest.approx(weight_norm, rel=1e-6)


@pytest.mark.parametrize("mode", ["prefix", "add"])
def test_the_engram_arrives_at_the_first_block_with_strength_times_the_tokens_norm_after_bos(arch, mode):
    """The cell's inputs as the sweep builds them, watched at block 0's input: the k engram rows (their position term
    taken away) have mean norm strength x that of real tokens there, and sit right after the BOS, which stays first."""
    from engram_eval.core.spec import Method
    from engram_eval.engram.extraction import extract_engram
    from engram_eval.core.spec import Extraction
    from engram_eval.steer.grid import Cell
    from engram_eval.steer.injection import CellVectors

    name, lm = arch
    _, arriving = plain_token_norm(lm.model)
    prompt_ids = tuple(lm.tokenizer(TINY_QUESTIONS["q1"][0])["input_ids"])
    raw = {("topic", LAYER, K): extract_engram(lm, TINY_SOURCES["topic"], layers=[LAYER], chunks=K, extraction=Extraction()).layers[LAYER]}
    cell = Cell("topic", "key", "relevant", None, LAYER, STRENGTH, K)
    steering = CellVectors(lm, raw, Method(mode), prompt_ids, [cell]).steering([cell])
    body = lm.model.get_input_embeddings()(torch.tensor([prompt_ids]))
    steered = steering.inputs(body)
    seen = first_block_input(lm.model, inputs_embeds=steered)[0]
    unsteered = first_block_input(lm.model, input_ids=torch.tensor([prompt_ids]))[0]
    start = 1 if ARCHITECTURES[name] else 0
    assert steering.start == start
    if mode == "prefix":
        engram_rows = seen[start:start + K] - position_terms(lm.model, len(seen))[start:start + K]
        assert torch.allclose(seen[:start], unsteered[:start], atol=1e-5)  # the BOS, unmoved
        positions = position_terms(lm.model, len(seen))  # GPT-2: the prompt now sits k positions later
        assert torch.allclose(seen[start + K:] - positions[start + K:], unsteered[start:] - positions[start:len(unsteered)],
                              atol=1e-4)  # the prompt after the engram
    else:  # add: what the engram added, at the k positions after the BOS
        engram_rows = seen[start:start + K] - unsteered[start:start + K]
        assert torch.allclose(seen[:start], unsteered[:start], atol=1e-5)
        assert torch.allclose(seen[start + K:], unsteered[start + K:], atol=1e-5)
    assert engram_rows.norm(dim=1).mean().item() == pytest.approx(STRENGTH * arriving, rel=1e-4), (name, mode)


@pytest.mark.parametrize("mode", ["prefix", "add", "actadd"])
def test_one_cell_of_each_mode_scores_what_the_plain_computation_scores(arch, mode, tmp_path):
    name, lm = arch
    result = sweep(lm, write_tiny_bank(tmp_path), tmp_path / "run", layers=[LAYER], strengths=[STRENGTH], chunks=K,
                   injection=mode, questions=["q1"])
    row = pl.read_parquet(result.results_path).filter(pl.col("engram") == "topic").row(0, named=True)
    ids = lm.tokenizer(TINY_SOURCES["topic"])["input_ids"]
    engram = reference_chunks(plain_states(lm.model, ids, LAYER), K)
    prompt, correct, incorrect = TINY_QUESTIONS["q1"]
    token_norm, _ = plain_token_norm(lm.model)
    expected = plain_cell(lm.model, lm.tokenizer, mode, prompt, correct, incorrect, engram, token_norm, ARCHITECTURES[name])
    assert row["prefix_at"] == "after-bos"
    assert (row["p_correct"], row["p_incorrect"]) == pytest.approx(expected, rel=1e-4, abs=1e-7), (name, mode)
    run = result.run
    assert run["embedding_scale"]["token_norm"] == pytest.approx(token_norm, rel=1e-5)
    assert run["prefix_placement"]["tokenizer_adds_bos"] == ARCHITECTURES[name]


@pytest.mark.parametrize("mode", ["prefix", "add"])
def test_prefix_at_start_puts_the_engram_before_the_bos(arch, mode, tmp_path):
    """`sweep --prefix-at start` from the command line: the seeds' placement, the engram at position 0 before any BOS
    (the plain computation's start = 0); a tokenizer without BOS gives what after-bos gives."""
    from click.testing import CliRunner

    from engram_eval.cli import cli

    name, lm = arch
    bank = write_tiny_bank(tmp_path)
    args = ["sweep", str(bank), "--model", lm.spec, "--layers", str(LAYER), "--strengths", str(STRENGTH), "--chunks", str(K),
            "--injection", mode, "--questions", "q1", "--store", str(tmp_path / "store"), "-q"]
    for place in ("start", "after-bos"):
        result = CliRunner().invoke(cli, [*args, "--prefix-at", place, "--out", str(tmp_path / place)])
        assert result.exit_code == 0, result.output
    rows = {place: pl.read_parquet(tmp_path / place / "results.parquet").filter(pl.col("engram") == "topic").row(0, named=True)
            for place in ("start", "after-bos")}
    ids = lm.tokenizer(TINY_SOURCES["topic"])["input_ids"]
    engram = reference_chunks(plain_states(lm.model, ids, LAYER), K)
    prompt, correct, incorrect = TINY_QUESTIONS["q1"]
    token_norm, _ = plain_token_norm(lm.model)
    expected = plain_cell(lm.model, lm.tokenizer, mode, prompt, correct, incorrect, engram, token_norm, adds_bos=False)
    assert rows["start"]["prefix_at"] == "start"
    assert (rows["start"]["p_correct"], rows["start"]["p_incorrect"]) == pytest.approx(expected, rel=1e-4, abs=1e-7)
    moved = rows["start"]["p_correct"] != pytest.approx(rows["after-bos"]["p_correct"], rel=1e-6)
    assert moved == ARCHITECTURES[name], name  # the placement matters exactly where the tokenizer adds a BOS
    recorded = json.loads((tmp_path / "start/run.json").read_text())
    assert recorded["settings"]["prefix_at"] == "start" and "prefix_at" not in json.loads(
        (tmp_path / "after-bos/run.json").read_text())["settings"]  # the default is recorded only when set: run ids kept
