"""The backend seam: extraction, injection, scoring and generation reach the model only through engram_eval.backend.interface.
A second backend that forwards each call to the Hugging Face one while the model object itself is poisoned gives the
same numbers; the decoder-block table finds another architecture's blocks, where a hook lands exactly."""

import dataclasses
import json

import polars as pl
import pytest
import torch

from conftest import sweep
from engram_eval.backend.hf import DECODER_BLOCKS, HFCausalLM, find_decoder_blocks
from engram_eval.backend.interface import Backend
from engram_eval.core.errors import EngramEvalError


class Poisoned:
    """Stands where the transformers model was: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"reached past the backend: model.{name}")


class Forwarding(Backend):
    """A second, minimal backend: every method forwards to another backend and is counted."""

    def __init__(self, inner: Backend):
        self.inner, self.device, self.dtype, self.calls = inner, inner.device, inner.dtype, {}

    def _forward(name):
        def method(self, *args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return getattr(self.inner, name)(*args, **kwargs)
        method.__name__ = name
        return method

    for _name in ("embed", "embedding_matrix", "hidden_states", "last_hidden", "logits", "full_logits", "blocks",
                  "attention_modules", "eager_attention", "prefill", "decode", "eos_token_ids", "bytes_per_sequence",
                  "free_memory", "flops_per_token", "generate"):
        locals()[_name] = _forward(_name)
    del _name, _forward

    num_layers = property(lambda self: self.inner.num_layers)
    hidden_size = property(lambda self: self.inner.hidden_size)
    max_positions = property(lambda self: self.inner.max_positions)


def test_every_stage_runs_through_another_backend_with_the_same_numbers(tiny, tiny_bank, tmp_path):
    from engram_eval.engram.extraction import extract_engram
    from engram_eval.run.generation import run_generate

    backend = Forwarding(tiny.backend)
    other = dataclasses.replace(tiny, model=Poisoned(), backend=backend)
    assert torch.equal(extract_engram(other, "A short source text.", [1, 4], chunks=2).layers[4],
                       extract_engram(tiny, "A short source text.", [1, 4], chunks=2).layers[4])
    for options in ({}, {"injection": "actadd", "record_attention": True}, {"scoring": "sequence"}):
        name = "-".join(map(str, options.values())) or "seed"
        here = sweep(tiny, tiny_bank, tmp_path / f"{name}-hf", **options)
        there = sweep(other, tiny_bank, tmp_path / f"{name}-forwarded", **options)
        assert pl.read_parquet(there.results_path).equals(pl.read_parquet(here.results_path)), options
        texts = [pl.read_parquet(run_generate(lm, run.out, max_new_tokens=3, progress=False).generations_path)
                 for lm, run in ((tiny, here), (other, there))]
        assert texts[1].equals(texts[0]), options
    assert {"hidden_states", "last_hidden", "logits", "blocks", "attention_modules", "eager_attention", "prefill", "decode",
            "eos_token_ids"} <= set(backend.calls)


def test_the_block_table_finds_another_architectures_blocks_and_a_hook_lands_there(tiny, tmp_path):
    from engram_eval.steer.injection import Steering
    from engram_eval.backend.model import random_init_model

    config = tmp_path / "gpt2.config.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 3, "n_head": 4,
                                  "vocab_size": len(tiny.tokenizer), "n_positions": 128}))
    lm = random_init_model(config, tiny.tokenizer, device=tiny.device, dtype=torch.float32)
    assert lm.backend.blocks() is lm.model.transformer.h and lm.num_layers == 3
    assert list(lm.backend.attention_modules()) == [block.attn for block in lm.model.transformer.h]
    ids = torch.tensor([[5, 6, 7, 8]])
    vector = torch.randn(1, 32)
    seen = []  # what block 2 receives: block 1's output, after the steering hook

    def capture(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    handle = lm.model.transformer.h[2].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            plain_logits = lm.backend.full_logits(lm.backend.embed(ids))
            with Steering("actadd", vector, [2]).active(lm.backend):
                steered_logits = lm.backend.full_logits(lm.backend.embed(ids))
    finally:
        handle.remove()
    # actadd at layer 2 adds the vector to block 1's output at every position
    assert torch.allclose(seen[1] - seen[0], vector.expand(4, -1).unsqueeze(0), atol=1e-5)
    assert not torch.allclose(plain_logits, steered_logits)
    assert "transformer.h" in DECODER_BLOCKS


def test_a_model_without_known_blocks_is_one_line_naming_the_table():
    with pytest.raises(EngramEvalError) as error:
        find_decoder_blocks(torch.nn.Linear(2, 2))
    assert str(error.value) == ("Linear: no decoder blocks at any of model.layers, transformer.h, gpt_neox.layers, "
                                "model.decoder.layers (add its path to engram_eval.backend.hf.DECODER_BLOCKS)")


def test_the_hugging_face_backend_is_the_models_own_calls(tiny):
    backend = tiny.backend
    assert isinstance(backend, HFCausalLM) and backend.blocks() is tiny.model.model.layers
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        reference = tiny.model(input_ids=ids, output_hidden_states=True)
        assert torch.equal(backend.hidden_states(ids)[-1], reference.hidden_states[-1])
        assert torch.equal(backend.logits(backend.last_hidden(backend.embed(ids))[0]), reference.logits[0].float())
        logits, _ = backend.prefill(backend.embed(ids), None, None)
        assert torch.allclose(logits, reference.logits[:, -1].float(), atol=1e-5)  # the head on one position: float rounding
    configured = tiny.model.generation_config.eos_token_id
    assert backend.eos_token_ids() == set(configured if isinstance(configured, list) else [configured or tiny.tokenizer.eos_token_id])


def code(path) -> str:
    """A module's code without its comments and strings."""
    import io
    import tokenize

    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return " ".join(t.string for t in tokens if t.type not in (tokenize.COMMENT, tokenize.STRING))


def test_only_the_backend_reaches_transformers_internals():
    from pathlib import Path

    internals = ("output_hidden_states", "past_key_values", "base_model", "set_attn_implementation", "_attn_implementation",
                 "get_input_embeddings", "get_output_embeddings", "logits_to_keep", "generation_config", ".config.", "lm.model")
    root = Path(__file__).resolve().parents[1] / "engram_eval"
    reaching = {str(path.relative_to(root)) for path in root.rglob("*.py") for name in internals
                if name.replace(".", " . ").strip() in code(path) or name in code(path)}
    assert "backend/hf.py" in reaching and reaching <= {"backend/hf.py", "backend/model.py"}, reaching  # model.py loads, fingerprints
