import pytest
import torch

from engram_eval.engram.pooling import chunk_mean
from reference import reference_chunks


@pytest.mark.parametrize("n,k", [(47, 16), (16, 16), (5, 16), (1, 16), (33, 4), (100, 1)])
def test_chunk_mean_equals_reference(n, k):
    states = torch.randn(n, 8)
    assert torch.allclose(chunk_mean(states, k), reference_chunks(states, k), atol=1e-6)


def test_remainder_goes_to_the_last_chunk():
    states = torch.arange(47, dtype=torch.float32).unsqueeze(1)
    means = chunk_mean(states, 16)[:, 0]
    assert means[:15].tolist() == [2 * i + 0.5 for i in range(15)]  # 15 chunks of 2
    assert means[15].item() == pytest.approx(sum(range(30, 47)) / 17)  # last chunk of 17


def test_short_text_is_padded_with_the_last_state():
    states = torch.arange(5, dtype=torch.float32).unsqueeze(1)
    assert chunk_mean(states, 16)[:, 0].tolist() == [0, 1, 2, 3, 4] + [4] * 11


def test_n_equals_k_gives_the_states_themselves():
    states = torch.randn(16, 4)
    assert torch.equal(chunk_mean(states, 16), states)


LONG = ("Alpha blockers first, then beta blockers. The tumor releases adrenaline; alpha blockade must come first. "
        "The spectral sequence is O B A F G K M, from hot blue stars to cool red stars. ") * 2


@pytest.mark.parametrize("pooling", ["mean", "last", "pca"])
@pytest.mark.parametrize("skip", [0, 1, 3])
def test_each_pooling_equals_the_reference_on_the_states_left_after_skipping(tiny, pooling, skip):
    from engram_eval.engram.extraction import Extraction, extract_engram
    from reference import reference_layer_states, reference_pool

    engram = extract_engram(tiny, LONG, layers=[0, 2, 4], chunks=4, extraction=Extraction(pooling=pooling, skip_tokens=skip))
    for layer in (0, 2, 4):
        states = reference_layer_states(tiny.model, tiny.tokenizer, LONG, layer)[skip:]
        expected = reference_pool(states, 4, pooling)
        assert torch.allclose(engram.layers[layer], expected, atol=1e-5, rtol=1e-4), (pooling, skip, layer)
    if pooling == "pca":
        for layer, vectors in engram.layers.items():
            states = reference_layer_states(tiny.model, tiny.tokenizer, LONG, layer)[skip:]
            assert torch.allclose(vectors.norm(dim=1), torch.ones(4), atol=1e-5)
            assert (vectors @ states.mean(dim=0) >= 0).all()


@pytest.mark.parametrize("pooling", ["mean", "last", "pca"])
def test_windows_equal_a_manual_concatenation_of_independent_windows(tiny, pooling):
    from engram_eval.engram.extraction import Extraction, extract_engram
    from reference import reference_pool, reference_window_states

    ids = tiny.tokenizer(LONG)["input_ids"]
    assert len(ids) > 3 * 16
    engram = extract_engram(tiny, LONG, layers=[1, 4], chunks=4, extraction=Extraction(pooling=pooling, window=16, skip_tokens=2))
    assert engram.windows == -(-len(ids) // 16) and engram.n_tokens == len(ids) and not engram.truncated
    for layer in (1, 4):
        expected = reference_pool(reference_window_states(tiny.model, ids, layer, 16)[2:], 4, pooling)
        assert torch.allclose(engram.layers[layer], expected, atol=1e-4, rtol=1e-4), (pooling, layer)


def test_a_source_in_one_window_is_not_windowed_and_mean_stays_the_seeds(tiny):
    from engram_eval.engram.extraction import Extraction, extract_engram

    seed = extract_engram(tiny, LONG, layers=[2], chunks=4)
    one_window = extract_engram(tiny, LONG, layers=[2], chunks=4, extraction=Extraction(window=10_000))
    assert torch.equal(seed.layers[2], one_window.layers[2]) and one_window.windows == 1


def test_one_forward_pass_serves_every_k(tiny, tmp_path):
    from engram_eval.engram.store import EngramStore

    calls = []
    handle = tiny.model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        built = EngramStore(tmp_path).ensure_all(tiny, "long", LONG, layers=[1, 3], chunks=[4, 8, 16])
    finally:
        handle.remove()
    assert len(calls) == 1 and [status for _, status in built.values()] == ["built"] * 3
    for k, (stored, _) in built.items():
        single, _ = EngramStore(tmp_path / str(k)).ensure(tiny, "long", LONG, layers=[1, 3], chunks=k)
        assert torch.equal(stored.engram.layers[3], single.engram.layers[3]) and stored.metadata["chunks"] == str(k)


@pytest.mark.parametrize("extraction,message", [
    (dict(pooling="last"), "source 'short': {n} tokens, fewer than k = 8: --pooling last needs at least k"),
    (dict(pooling="pca"), "source 'short': {n} tokens, at most k = 8: --pooling pca needs more than k (the centred states have rank n - 1)"),
    (dict(skip_tokens=1), "source 'short': --skip-tokens 1 leaves {m} tokens, fewer than k = 8"),
    (dict(window=4), "--window: 4 tokens is smaller than k = 8"),
    (dict(pooling="median"), "--pooling: unknown 'median' (one of: mean, last, pca, learned)"),
])
def test_sources_a_pooling_cannot_use_are_refused_naming_them(tiny, tmp_path, extraction, message):
    from engram_eval.engram.extraction import Extraction
    from engram_eval.core.errors import EngramEvalError
    from engram_eval.engram.store import EngramStore

    text = "alpha beta gamma"
    n = len(tiny.tokenizer(text)["input_ids"])
    assert n <= 8
    with pytest.raises(EngramEvalError) as error:
        EngramStore(tmp_path).ensure_all(tiny, "short", text, layers=[1], chunks=[8], extraction=Extraction(**extraction))
    assert str(error.value) == message.format(n=n, m=n - 1)
    assert not list(tmp_path.iterdir())
