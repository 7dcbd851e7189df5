import pytest
import torch

from engram_eval.cli.parsing import parse_layers
from engram_eval.engram.extraction import extract_engram
from engram_eval.core.errors import EngramEvalError
from reference import reference_chunks, reference_engram


def test_layer_zero_is_the_embedding_output(tiny):
    engram = extract_engram(tiny, "alpha blockers first", layers=[0], chunks=3)
    ids = tiny.tokenizer("alpha blockers first")["input_ids"]
    embeds = tiny.model.get_input_embeddings().weight[ids].detach()
    assert torch.allclose(engram.layers[0], reference_chunks(embeds, 3), atol=1e-6)


def test_one_pass_extraction_equals_per_layer_extraction(tiny):
    text = "Alpha blockers first, then beta blockers. The tumor releases adrenaline."
    layers = list(range(tiny.num_layers + 1))
    engram = extract_engram(tiny, text, layers=layers, chunks=4)
    for layer in layers:
        expected = reference_engram(tiny.model, tiny.tokenizer, text, layer, k=4)
        assert torch.allclose(engram.layers[layer], expected, atol=1e-5), layer


def test_extraction_is_float32_and_shaped_k_by_hidden(tiny):
    engram = extract_engram(tiny, "alpha", layers=[1, 2], chunks=16)
    assert {layer: (v.dtype, tuple(v.shape)) for layer, v in engram.layers.items()} == {
        1: (torch.float32, (16, 32)), 2: (torch.float32, (16, 32))}


def test_truncation_is_reported(tiny):
    engram = extract_engram(tiny, "alpha beta " * 50, layers=[1], chunks=4, max_tokens=10)
    assert (engram.n_tokens, engram.truncated) == (10, True)


@pytest.mark.parametrize("text,expected", [("all", [0, 1, 2, 3, 4]), ("1,3", [1, 3]), ("1-3", [1, 2, 3]), ("0, 2-3", [0, 2, 3])])
def test_parse_layers(text, expected):
    assert parse_layers(text, 4) == expected


@pytest.mark.parametrize("text,message", [
    ("5", "--layers: layer 5 is out of range; valid layers are 0..4 (0 = embedding output, 4 = last)"),
    ("1,x", "--layers: malformed '1,x' (expected 'all', '4,8,12' or '10-20'); valid layers are 0..4 (0 = embedding output, 4 = last)"),
    ("3-1", "--layers: range '3-1' runs backwards; valid layers are 0..4 (0 = embedding output, 4 = last)"),
    ("-1", "--layers: malformed '-1' (expected 'all', '4,8,12' or '10-20'); valid layers are 0..4 (0 = embedding output, 4 = last)"),
])
def test_parse_layers_rejects_bad_input(text, message):
    with pytest.raises(EngramEvalError) as error:
        parse_layers(text, 4)
    assert str(error.value) == message


@pytest.mark.real_model
def test_real_model_engram_equals_recomputation(real):
    text = (pytest.importorskip("pathlib").Path(__file__).parents[1] / "questions/sources/pheo.txt").read_text()
    engram = extract_engram(real, text, layers=[0, 12, 30], chunks=16)
    n = len(real.tokenizer(text)["input_ids"])
    assert engram.n_tokens == n and not engram.truncated
    for layer in (0, 12, 30):
        assert engram.layers[layer].shape == (16, 576)
        expected = reference_engram(real.model, real.tokenizer, text, layer, k=16)
        assert torch.allclose(engram.layers[layer], expected, rtol=1e-4, atol=1e-4), layer


@pytest.mark.parametrize("layers,message", [
    ([5], "--layers: layer 5 is out of range; valid layers are 0..4 (0 = embedding output, 4 = last)"),
    ([-1], "--layers: layer -1 is out of range; valid layers are 0..4 (0 = embedding output, 4 = last)"),
    ([], "--layers: no layers given; valid layers are 0..4 (0 = embedding output, 4 = last)"),
])
def test_the_library_refuses_bad_layers_with_the_command_lines_message(tiny, layers, message):
    with pytest.raises(EngramEvalError) as error:
        extract_engram(tiny, "alpha", layers=layers, chunks=4)
    assert str(error.value) == message


def _words(seed: int, n: int) -> str:
    import random

    rng = random.Random(seed)
    vocabulary = ["alpha", "beta-blocker", "Zürich", "  ", "\n\n", "1234567", "qwertyuiopasdfgh", "—", "日本語", ",", "the"]
    return "".join(rng.choice(vocabulary) + rng.choice([" ", "", "\n"]) for _ in range(n))


@pytest.mark.parametrize("model", ["tiny", "real"])
def test_a_long_source_is_tokenized_only_as_far_as_the_cut_and_gives_the_same_ids(model, request):
    from dataclasses import replace

    from engram_eval.engram.extraction import tokenize_source

    lm = request.getfixturevalue(model)
    seen: list[int] = []
    tokenizer = lm.tokenizer

    class Recording:
        def __call__(self, text, *args, **kwargs):
            seen.append(len(text))
            return tokenizer(text, *args, **kwargs)

    recording = replace(lm, tokenizer=Recording())
    for seed, (n_words, max_tokens) in enumerate([(40_000, 64), (40_000, 2048), (300, 2048), (5_000, 700)]):
        text = _words(seed, n_words)
        seen.clear()
        ids, truncated = tokenize_source(recording, text, max_tokens)
        whole = tokenizer(text)["input_ids"]
        assert (ids, truncated) == (whole[:max_tokens], len(whole) > max_tokens), (seed, n_words, max_tokens)
        if max_tokens == 64:
            assert max(seen) < len(text) / 50, (seed, max(seen), len(text))  # a few pages of a long text, never all of it
