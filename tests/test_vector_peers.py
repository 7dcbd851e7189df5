"""--coefficients 1 is the source tool's own application, on the embedded SmolLM2: logits equal to 1e-4 against
steering-vectors' SteeringVector.apply() and lm-eval's `steered` model on the same file, and `vectors build` equal to
steering-vectors' train_steering_vector on the same pairs (the peers are pinned in the dev extra)."""

from __future__ import annotations

import pytest
import torch

from engram_eval.vectors.formats import read_vector
from test_vector_steering import PROMPT, steered_logits

pytestmark = pytest.mark.filterwarnings("ignore")
BLOCK = 7  # engram-eval's layer 8


def prompt_ids(lm) -> torch.Tensor:
    return torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])


def test_steering_vectors_apply_equals_ours(real, tmp_path):
    from steering_vectors import SteeringVector as PeerVector

    v = torch.randn(real.hidden_size, generator=torch.Generator().manual_seed(1)) * 4
    torch.save({BLOCK: v}, tmp_path / "sv.pt")
    vector = read_vector(tmp_path / "sv.pt")
    for multiplier in (1.0, -3.0):
        with torch.no_grad(), PeerVector({BLOCK: v}).apply(real.model, multiplier=multiplier):
            expected = real.model(prompt_ids(real)).logits[0]
        got = steered_logits(real, vector, multiplier, layer=BLOCK + 1)
        assert (got - expected).abs().max() < 1e-4
        assert (expected - real.model(prompt_ids(real)).logits[0]).abs().max() > 0.1  # the vector does something


@pytest.mark.parametrize("action", ["add", "clamp"])
def test_lm_eval_steered_model_equals_ours(real, tmp_path, action):
    from lm_eval.models.hf_steered import SteeredModel

    v = torch.randn(real.hidden_size, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "steer.pt"
    torch.save({f"layers.{BLOCK}": {"steering_vector": v, "steering_coefficient": 6.0, "action": action, "bias": None}}, path)
    peer = SteeredModel(pretrained=real.source, steer_path=str(path), device="cpu", dtype="float32")
    with torch.no_grad():
        expected = peer._model_call(prompt_ids(real))[0]
    got = steered_logits(real, read_vector(path), 1.0, layer=BLOCK + 1)
    assert (got - expected).abs().max() < 1e-4


def test_caa_build_equals_train_steering_vector(real):
    from steering_vectors import train_steering_vector

    from engram_eval.vectors.caa import ContrastPair, build_caa

    pairs = [("Paris is in France.", "Paris is in Peru."), ("Ice is cold.", "Ice is hot."),
             ("Two plus two is four.", "Two plus two is five.")]
    peer = train_steering_vector(real.model, real.tokenizer, pairs, layers=[BLOCK, real.num_layers - 1],
                                 read_token_index=-1)
    ours = build_caa(real, [ContrastPair(*pair) for pair in pairs], [BLOCK + 1, real.num_layers], "last")
    for block, activation in peer.layer_activations.items():
        assert (ours.directions[block + 1] - activation.float()).abs().max() < 1e-4
