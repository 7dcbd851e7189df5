"""Shared fixtures: a tiny random-init Llama with a BPE tokenizer trained on the spot, a tiny bank, the real model."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

from engram_eval.backend.model import LoadedModel, load_model

REPO = Path(__file__).resolve().parents[1]


def module_unless_mapping(fixture_name: str, config) -> str:
    """The scope of a fixture that computes a summary once per module. mutmut (`make mutation`) credits a test with
    the functions called while it runs; while it maps them (MUTANT_UNDER_TEST=stats) each test computes its own, so
    every test that reads the summary is run against the summary's mutants, not only the first."""
    return "function" if os.environ.get("MUTANT_UNDER_TEST") == "stats" else "module"

def wait_for(ready, process: subprocess.Popen) -> bool:
    """Poll until ready() holds (the event a test waits for: a file, a lock, a checksum) -> True, or until the process has
    ended -> False. No deadline: how long it takes is the machine's business, not the test's."""
    while not ready():
        if process.poll() is not None:
            return ready()
        time.sleep(0.002)
    return True


TINY_SOURCES = {
    "topic": "Alpha blockers first, then beta blockers. The tumor releases adrenaline; alpha blockade must come first. " * 3,
    "anti": "Beta blockers first, then alpha blockers. The tumor releases adrenaline; beta blockade must come first. " * 3,
    "stars": "The spectral sequence is O B A F G K M, from hot blue stars to cool red stars.",
    "noise": "apple river table window garden pencil cloud mountain letter button candle",
}
TINY_QUESTIONS = {
    "q1": ("The first medication for the tumor should be", [" alpha", " phenoxy"], [" beta", " metoprolol"]),
    "q2": ("Before glucose you must give", [" thiamine"], [" insulin", " glucose"]),
    "q3": ("The antidote is", [" dantrolene"], [" cooling", " ice"]),
}


def _corpus() -> list[str]:
    words = " ".join(TINY_SOURCES.values())
    for prompt, correct, incorrect in TINY_QUESTIONS.values():
        words += " " + prompt + "".join(correct + incorrect)
    return [words] * 30


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|end|>"])
    backend.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>")
    tokenizer.chat_template = "{% for m in messages %}<user> {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.3,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_model_dir) -> LoadedModel:
    return load_model(str(tiny_model_dir), device="cpu")


def write_tiny_bank(folder: Path, questions: dict = TINY_QUESTIONS, extra: str = "") -> Path:
    sources = "\n".join(
        f"  {name}: {{text: \"{text}\", kind: {kind}}}"
        for name, text, kind in [
            ("topic", TINY_SOURCES["topic"], "relevant"), ("anti", TINY_SOURCES["anti"], "anti"),
            ("stars", TINY_SOURCES["stars"], "irrelevant"), ("noise", TINY_SOURCES["noise"], "random"),
        ]
    )
    items = "\n".join(
        textwrap.dedent(
            f"""\
              - id: {qid}
                prompt: "{prompt}"
                correct: {correct!r}
                incorrect: {incorrect!r}
                engram: topic
                related_wrong: {str(i % 2 == 0).lower()}
                tags: [tiny]"""
        ).replace("'", '"')
        for i, (qid, (prompt, correct, incorrect)) in enumerate(questions.items())
    )
    text = f"name: tiny\nsources:\n{sources}\ndefaults:\n  controls: [stars, noise, anti]\n{extra}questions:\n{textwrap.indent(items, '')}\n"
    path = folder / "tiny.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def tiny_bank(tmp_path) -> Path:
    return write_tiny_bank(tmp_path)


@pytest.fixture(scope="session")
def real() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct (first use dequantizes the GGUF into the user cache, ~40 s)."""
    return load_model("smollm2-135m", device="cpu")


SWEEP_GRID = dict(layers=[1, 4], strengths=[0.5, 3.0], chunks=4)


def flat_sweep(lm: LoadedModel, bank, store, out: Path, *, batch_size: int | None = None, ray=None, force: bool = False,
               strict: bool = False, progress: bool = True, neutral=None, **keywords):
    """run_sweep from the command line's flat keywords: the spec's (SweepSpec.build), the execution's (batch_size, ray)
    and the observer's (progress, log, warn, before_question); neutral: the probe's passage (a NeutralPassage)."""
    from engram_eval.core.spec import Execution, Observer, SweepSpec
    from engram_eval.run.sweep import run_sweep

    observed = {name: keywords.pop(name) for name in ("log", "warn", "before_question") if name in keywords}
    return run_sweep(lm, bank, store, out, SweepSpec.build(**keywords), execution=Execution(batch_size, ray), force=force,
                     strict=strict, neutral=neutral, observer=Observer(progress=progress, **observed))


def sweep(lm: LoadedModel, bank_path: Path, out: Path, **kwargs):
    """A small sweep of a bank on the tiny model, store beside the run directory."""
    from engram_eval.bank.banks import load_bank
    from engram_eval.engram.store import EngramStore

    options = {**SWEEP_GRID, "progress": False, **kwargs}
    return flat_sweep(lm, load_bank(bank_path), EngramStore(out.parent / "store"), out, **options)


@pytest.fixture(scope="session")
def run(tiny, tmp_path_factory):
    """(results frame, run.json) of a tiny-model sweep of the tiny bank over a 3 x 3 grid, shared by report tests."""
    import polars as pl

    folder = tmp_path_factory.mktemp("report")
    result = sweep(tiny, write_tiny_bank(folder), folder / "run", layers=[1, 2, 4], strengths=[1.0, 5.0, 20.0])
    return pl.read_parquet(result.results_path), result.run


def assert_same_results(got, expected, rel: float = 1e-5, atol: float = 1e-6) -> None:
    """Two results frames agree: every non-float column exactly, every float column within a relative tolerance
    (batching changes float32 reduction order, nothing else)."""
    import polars as pl

    assert got.columns == expected.columns and got.height == expected.height
    floats = [name for name, dtype in expected.schema.items() if dtype in (pl.Float64, pl.Float32) and name != "strength"]
    assert got.drop(floats).equals(expected.drop(floats))
    for name in floats:
        a, b = got[name].to_numpy(), expected[name].to_numpy()
        both_null = got[name].is_null().to_numpy() & expected[name].is_null().to_numpy()
        assert ((abs(a - b) <= rel * abs(b) + atol) | (a == b) | both_null).all(), name


@pytest.fixture(scope="session")
def shallow_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A second local model: the tiny model's first 2 of 4 layers, same tokenizer (models of different depth)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("shallow")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.num_hidden_layers = 2
    model.model.layers = model.model.layers[:2]
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def load_script(relative: str):
    """A script beside the package (docs/findings.py, questions/sources/*.py) as a module, without running its main."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(relative).stem, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
