"""A steering vector acts where its tool says, as its tool does: at the output of block L-1 only (a forward hook
written here is the reference; the mapping shifted by one gives other logits), c x v with its magnitude kept,
lm-eval's clamp, the norm-relative scaling, and the paired controls."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import pytest
import torch

from engram_eval.core.spec import Method
from engram_eval.steer.grid import vector_cells
from engram_eval.steer.injection import CellVectors, vector_injection
from engram_eval.vectors.controls import NEGATED, RANDOM_DIRECTION, random_direction, vector_raw
from engram_eval.vectors.vector import SteeringVector
from reference import block_output_added

PROMPT = "the cat sat on the mat and"
LAYER = 2  # engram-eval's numbering: the output of block 1


def steered_logits(lm, vector: SteeringVector, coefficient: float, layer: int = LAYER, name: str = "v",
                   scaling: str = "coefficient") -> torch.Tensor:
    """Through the package: the cell's Steering from CellVectors, the hooks it installs, the full logits."""
    ids = tuple(lm.tokenizer(PROMPT)["input_ids"])
    injection = vector_injection(vector.action)
    cells = [c for c in vector_cells("v", "key", [layer], [coefficient]) if c.engram == name]
    method = Method(injection=injection, scaling=scaling, vector="v")
    steering = CellVectors(lm, vector_raw(vector, "v", [layer]), method, ids, cells).steering(cells)
    with torch.no_grad(), steering.active(lm.backend):
        return lm.backend.full_logits(steering.inputs(lm.backend.embed(torch.tensor([ids]))))[0]


def hooked_logits(lm, block: int | None, added: torch.Tensor | None) -> torch.Tensor:
    ids = torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        if block is None:
            return lm.model(ids).logits[0]
        with block_output_added(lm.model, block, added):
            return lm.model(ids).logits[0]


@contextmanager
def block_outputs(lm, captured: dict):
    handles = [block.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, (out[0] if isinstance(out, tuple) else out).clone()))
               for i, block in enumerate(lm.model.model.layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def test_adds_c_v_to_block_l_minus_1_and_nowhere_else(tiny):
    v = torch.randn(tiny.hidden_size) * 2
    vector = SteeringVector({LAYER: v})
    got = steered_logits(tiny, vector, 1.5)
    assert torch.allclose(got, hooked_logits(tiny, LAYER - 1, 1.5 * v), atol=1e-5)
    for shifted in (LAYER - 2, LAYER):  # an off-by-one mapping gives other logits: the comparison above can tell
        assert not torch.allclose(got, hooked_logits(tiny, shifted, 1.5 * v), atol=1e-3)
    plain, steered = {}, {}
    with block_outputs(tiny, plain):
        hooked_logits(tiny, None, None)
    with block_outputs(tiny, steered):
        steered_logits(tiny, vector, 1.5)
    for block in range(LAYER - 1):
        assert torch.equal(plain[block], steered[block])  # before the site: untouched
    for block in range(LAYER, tiny.num_layers):
        assert not torch.allclose(plain[block], steered[block], atol=1e-3)  # after it: moved


@pytest.mark.parametrize("fmt", ["gguf", "steering-vectors", "lm-eval"])
def test_an_imported_vector_acts_on_the_block_its_tool_named(tiny, tmp_path, fmt):
    """A direction written for block 1 by each tool's own layout, imported, applied through the package: the same
    logits as a hook adding it to block 1's output (and not block 0's or 2's: a shifted mapping fails here)."""
    from engram_eval.vectors.formats import read_vector
    from reference import repeng_export_gguf

    block, v = 1, torch.randn(tiny.hidden_size) * 3
    if fmt == "gguf":
        path = tmp_path / "v.gguf"
        repeng_export_gguf({block: v.numpy()}, "llama", path)
    else:
        path = tmp_path / "v.pt"
        torch.save({block: v} if fmt == "steering-vectors" else
                   {f"layers.{block}": {"steering_vector": v, "steering_coefficient": 1.0, "action": "add", "bias": None}}, path)
    vector = read_vector(path, fmt)
    (layer,) = vector.layers
    got = steered_logits(tiny, vector, 1.0, layer=layer)
    assert torch.allclose(got, hooked_logits(tiny, block, v), atol=1e-5)
    for other in (block - 1, block + 1):
        assert not torch.allclose(got, hooked_logits(tiny, other, v), atol=1e-3)


def test_site_output_moves_by_exactly_c_v(tiny):
    v = torch.randn(tiny.hidden_size)
    captured: dict = {}
    ids = tuple(tiny.tokenizer(PROMPT)["input_ids"])
    handle = tiny.model.model.layers[LAYER].register_forward_pre_hook(lambda m, args: captured.__setitem__("in", args[0].clone()))
    try:
        hooked_logits(tiny, None, None)
        before = captured["in"]
        steered_logits(tiny, SteeringVector({LAYER: v}), -2.0)
        after = captured["in"]
    finally:
        handle.remove()
    assert after.shape[1] == len(ids)
    assert torch.allclose(after - before, (-2.0 * v).expand_as(before), atol=1e-5)


def test_norm_scaling_is_strength_times_the_residual_norm(tiny):
    v = torch.randn(tiny.hidden_size) * 7
    captured: dict = {}
    handle = tiny.model.model.layers[LAYER - 1].register_forward_hook(
        lambda m, a, out: captured.setdefault("out", (out[0] if isinstance(out, tuple) else out).clone()))
    try:
        hooked_logits(tiny, None, None)
    finally:
        handle.remove()
    s = captured["out"][0].float().norm(dim=-1).mean()
    got = steered_logits(tiny, SteeringVector({LAYER: v}), 0.5, scaling="norm")
    assert torch.allclose(got, hooked_logits(tiny, LAYER - 1, 0.5 * s * v / v.norm()), atol=1e-4)


def test_clamp_equals_lm_eval_clamp(tiny):
    from lm_eval.models.hf_steered import SteeredModel, steer

    v, bias = torch.randn(tiny.hidden_size), torch.randn(tiny.hidden_size)
    value = 3.0
    vector = SteeringVector({LAYER: v / v.norm() * value}, action="clamp", bias={LAYER: bias})
    got = steered_logits(tiny, vector, 1.0)
    ids = torch.tensor([tiny.tokenizer(PROMPT)["input_ids"]])
    hook = partial(SteeredModel.clamp, direction=v / v.norm(), value=value, bias=bias, head_index=None)
    with torch.no_grad(), steer(tiny.model, {f"layers.{LAYER - 1}": hook}):
        expected = tiny.model(ids).logits[0]
    assert torch.allclose(got, expected, atol=1e-5)
    # coefficient 2 clamps to twice the value
    hook2 = partial(SteeredModel.clamp, direction=v / v.norm(), value=2 * value, bias=bias, head_index=None)
    with torch.no_grad(), steer(tiny.model, {f"layers.{LAYER - 1}": hook2}):
        expected2 = tiny.model(ids).logits[0]
    assert torch.allclose(steered_logits(tiny, vector, 2.0), expected2, atol=1e-5)


def test_controls_random_direction_of_equal_norm_and_negated(tiny):
    v = torch.randn(tiny.hidden_size) * 5
    vector = SteeringVector({LAYER: v, LAYER + 1: 2 * v})
    for layer in vector.layers:
        r = random_direction(vector, layer)
        assert torch.isclose(r.norm(), vector.directions[layer].norm())
        assert torch.equal(r, random_direction(SteeringVector({LAYER: v, LAYER + 1: 2 * v}), layer))  # seeded
        assert abs(torch.nn.functional.cosine_similarity(r, vector.directions[layer], dim=0)) < 0.9
    assert not torch.equal(random_direction(vector, LAYER), random_direction(vector, LAYER + 1))
    raw = vector_raw(vector, "v", [LAYER])
    assert torch.equal(raw[(NEGATED, LAYER, 1)][0], -v)
    assert torch.allclose(steered_logits(tiny, vector, 1.0, name=NEGATED), hooked_logits(tiny, LAYER - 1, -v), atol=1e-5)
    assert torch.allclose(steered_logits(tiny, vector, 1.0, name=RANDOM_DIRECTION),
                          hooked_logits(tiny, LAYER - 1, random_direction(vector, LAYER)), atol=1e-5)


@pytest.mark.parametrize("read", ["last", "mean"])
def test_caa_is_the_mean_difference_at_block_outputs(tiny, read):
    from engram_eval.vectors.caa import ContrastPair, build_caa

    pairs = [ContrastPair("the cat is black", "the cat is white"), ContrastPair("stars are hot", "stars are cold")]
    layers = [1, tiny.num_layers]
    vector = build_caa(tiny, pairs, layers, read)
    for layer in layers:
        differences = []
        for pair in pairs:
            sides = []
            for text in (pair.positive, pair.negative):
                captured: dict = {}
                with block_outputs(tiny, captured):
                    hooked_logits_of(tiny, text)
                states = captured[layer - 1][0]
                sides.append(states[-1] if read == "last" else states.mean(dim=0))
            differences.append(sides[0] - sides[1])
        assert torch.allclose(vector.directions[layer], torch.stack(differences).mean(dim=0), atol=1e-5)


def hooked_logits_of(lm, text: str) -> None:
    with torch.no_grad():
        lm.model(torch.tensor([lm.tokenizer(text)["input_ids"]]))
