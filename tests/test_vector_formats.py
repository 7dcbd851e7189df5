"""Every vector format against a file written the way its tool writes it: the directions land at engram-eval's layer
N+1 for the source's block N, magnitudes kept, the mapping recorded; malformed files are one line naming the file."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engram_eval.core.errors import EngramEvalError
from engram_eval.core.registry import VECTOR_FORMATS
from engram_eval.vectors.formats import detect, read_vector
from engram_eval.vectors.formats.gguf import write_gguf
from engram_eval.vectors.store import VectorStore
from engram_eval.vectors.vector import SteeringVector
from reference import repeng_export_gguf

WIDTH = 8


def directions(blocks=(1, 2, 3)) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {block: rng.standard_normal(WIDTH).astype(np.float32) * (block + 1) for block in blocks}


def test_every_registered_format_has_its_module_and_a_convention():
    for name in VECTOR_FORMATS:
        fmt = VECTOR_FORMATS[name]
        assert fmt.name == name and fmt.convention and fmt.suffixes
        assert type(fmt).__module__ == f"engram_eval.vectors.formats.{name.replace('-', '_')}"


def test_repeng_gguf_maps_direction_n_to_layer_n_plus_1(tmp_path):
    source = directions()
    path = tmp_path / "v.gguf"
    repeng_export_gguf(source, "llama", path)
    vector = read_vector(path)
    assert vector.layers == [2, 3, 4]
    for block, array in source.items():
        assert torch.equal(vector.directions[block + 1], torch.from_numpy(array))
    assert vector.model_hint == "llama"
    assert vector.source["format"] == "gguf" and vector.source["layer_map"] == {"1": 2, "2": 3, "3": 4}
    assert "block N" in vector.source["convention"]


def test_gguf_direction_0_is_skipped_as_llama_cpp_does(tmp_path):
    path = tmp_path / "v.gguf"
    repeng_export_gguf(directions((0, 5)), "llama", path)
    vector = read_vector(path)
    assert vector.layers == [6] and vector.source["skipped"] == ["direction.0"]


@pytest.mark.parametrize("problem", ["architecture", "layer_count", "no-direction"])
def test_malformed_gguf_is_one_line(tmp_path, problem):
    import gguf

    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(path, "llama" if problem == "architecture" else "controlvector")
    writer.add_uint32("controlvector.layer_count", 3 if problem == "layer_count" else 1)
    if problem != "no-direction":
        writer.add_tensor("direction.1", np.ones(WIDTH, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(EngramEvalError) as error:
        read_vector(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_gguf_export_then_import_gives_the_same_tensors(tmp_path):
    vector = SteeringVector({3: torch.randn(WIDTH), 7: torch.randn(WIDTH)}, model_hint="llama")
    write_gguf(vector, tmp_path / "out.gguf", "llama")
    back = read_vector(tmp_path / "out.gguf")
    assert back.layers == [3, 7]
    assert all(torch.equal(back.directions[layer], vector.directions[layer]) for layer in vector.layers)
    vector.save(tmp_path / "out.safetensors")
    again = read_vector(tmp_path / "out.safetensors")
    assert again.source["format"] == "engram-eval" and again.sha256 == vector.sha256


@pytest.mark.parametrize("wrapped", [False, True])
def test_steering_vectors_pt_dict(tmp_path, wrapped):
    layers = {block: torch.from_numpy(array) for block, array in directions((0, 4)).items()}
    path = tmp_path / "sv.pt"
    torch.save({"layer_activations": layers, "layer_type": "decoder_block"} if wrapped else layers, path)
    assert detect(path) == "steering-vectors"
    vector = read_vector(path)
    assert vector.layers == [1, 5] and torch.equal(vector.directions[5], layers[4])


def test_steering_vectors_safetensors_by_layer_number(tmp_path):
    layers = {str(block): torch.from_numpy(array) for block, array in directions((2,)).items()}
    save_file(layers, tmp_path / "sv.safetensors")
    vector = read_vector(tmp_path / "sv.safetensors")
    assert vector.source["format"] == "steering-vectors" and vector.layers == [3]


def test_lm_eval_add_keeps_the_coefficient_in_the_vector(tmp_path):
    v = torch.randn(WIDTH)
    path = tmp_path / "steer.pt"
    torch.save({"layers.2": {"steering_vector": v, "steering_coefficient": 3.0, "action": "add", "bias": None}}, path)
    vector = read_vector(path)
    assert detect(path) == "lm-eval" and vector.action == "add" and vector.layers == [3]
    assert torch.allclose(vector.directions[3], 3.0 * v)
    assert vector.source["hookpoints"] == {"layers.2": 3}


def test_lm_eval_clamp_is_the_unit_vector_times_the_value(tmp_path):
    v, bias = torch.randn(WIDTH), torch.randn(WIDTH)
    path = tmp_path / "steer.pt"
    torch.save({"model.layers.1": {"steering_vector": v, "steering_coefficient": -2.0, "action": "clamp", "bias": bias}}, path)
    vector = read_vector(path)
    assert vector.action == "clamp" and torch.allclose(vector.directions[2], -2.0 * v / v.norm())
    assert torch.equal(vector.bias[2], bias)


@pytest.mark.parametrize("entry, message", [
    ({"steering_vector": torch.ones(WIDTH), "action": "add", "head_index": 1}, "head_index"),
    ({"steering_vector": torch.ones(WIDTH), "action": "add", "bias": torch.ones(WIDTH)}, "bias with action add"),
    ({"steering_vector": torch.ones(WIDTH), "action": "scale"}, "one action per file"),
    ({"steering_vector": torch.ones(2, WIDTH), "action": "add"}, "1-D float vector"),
])
def test_lm_eval_refusals(tmp_path, entry, message):
    path = tmp_path / "steer.pt"
    torch.save({"layers.0": entry}, path)
    with pytest.raises(EngramEvalError, match=message):
        read_vector(path, "lm-eval")


def test_lm_eval_hookpoint_that_is_not_a_block(tmp_path):
    path = tmp_path / "steer.pt"
    torch.save({"layers.0.mlp": {"steering_vector": torch.ones(WIDTH), "action": "add"}}, path)
    with pytest.raises(EngramEvalError, match="not a decoder block's output"):
        read_vector(path, "lm-eval")


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pt_files_are_never_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"layers.0": {"steering_vector": Payload()}}, f)
    for format_name in ("auto", "lm-eval", "steering-vectors"):
        with pytest.raises(EngramEvalError, match="weights_only=True"):
            read_vector(path, format_name)
    assert "unpickled!" not in capsys.readouterr().out


def test_plain_files_need_a_layer(tmp_path):
    np.save(tmp_path / "v.npy", np.arange(WIDTH, dtype=np.float32))
    with pytest.raises(EngramEvalError, match="--layer"):
        read_vector(tmp_path / "v.npy")
    vector = read_vector(tmp_path / "v.npy", layer=5)
    assert vector.layers == [5] and torch.equal(vector.directions[5], torch.arange(WIDTH, dtype=torch.float32))
    save_file({"steer": torch.ones(WIDTH)}, tmp_path / "v.safetensors")
    assert read_vector(tmp_path / "v.safetensors", layer=2).source["format"] == "safetensors"
    with pytest.raises(EngramEvalError, match="--layer"):
        read_vector(tmp_path / "v.safetensors", layer=0)


def test_npy_object_arrays_are_refused(tmp_path):
    np.save(tmp_path / "v.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(EngramEvalError, match="without pickle"):
        read_vector(tmp_path / "v.npy", layer=1)


def test_model_checks(tmp_path):
    vector = SteeringVector({3: torch.ones(WIDTH)}, model_hint="gemma3")
    with pytest.raises(EngramEvalError, match="8 wide"):
        vector.check_model("f", 4, 16, "gemma3")
    with pytest.raises(EngramEvalError, match="outside the model's blocks 1..2"):
        vector.check_model("f", 2, WIDTH, "gemma3")
    with pytest.raises(EngramEvalError, match="model_hint 'gemma3'"):
        vector.check_model("f", 4, WIDTH, "llama")
    vector.check_model("f", 4, WIDTH, "gemma3")


def test_store_round_trip_and_tamper(tmp_path):
    store = VectorStore(tmp_path)
    vector = SteeringVector({1: torch.randn(WIDTH)}, source={"format": "npy"})
    path = store.save("v1", vector)
    assert store.load("v1").vector.sha256 == vector.sha256 and store.names() == ["v1"]
    with pytest.raises(EngramEvalError, match="already stored"):
        store.save("v1", vector)
    with pytest.raises(EngramEvalError, match="not a vector name"):
        store.save("../x", vector)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EngramEvalError, match="checksum"):
        store.load("v1")


def test_import_offers_every_format():
    from engram_eval.cli import cli

    (param,) = [p for p in cli.commands["vectors"].commands["import"].params if p.name == "format_name"]
    assert tuple(param.type.choices) == ("auto", *VECTOR_FORMATS.names())
    assert all(f"{name}:" in param.help for name in VECTOR_FORMATS.names())
