"""The three commands of the README on the embedded SmolLM2 (import, sweep --vector, report), for each tool's file:
the results equal a forward hook adding c x v at the block the tool named, the controls are there, the report's
anti-steerable fraction is the share counted here; and each refusal is one line."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from engram_eval.cli import cli
from reference import block_output_added, repeng_export_gguf

REPO_BANK = "questions/ci.yaml"
BLOCK = 7  # every tool's block 7 is engram-eval's layer 8
pytestmark = pytest.mark.filterwarnings("ignore")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def write_tool_file(fmt: str, folder, v: torch.Tensor):
    if fmt == "gguf":
        path = folder / "v.gguf"
        repeng_export_gguf({BLOCK: v.numpy()}, "llama", path)
    elif fmt == "steering-vectors":
        path = folder / "sv.pt"
        torch.save({BLOCK: v}, path)
    else:
        path = folder / "steer.pt"
        torch.save({f"layers.{BLOCK}": {"steering_vector": v / 2, "steering_coefficient": 2.0, "action": "add", "bias": None}}, path)
    return path


def first_token_p(lm, prompt: str, variants: list[str], added: torch.Tensor) -> float:
    ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
    with torch.no_grad(), block_output_added(lm.model, BLOCK, added):
        probs = torch.softmax(lm.model(ids).logits[0, -1].float(), dim=-1)
    return max(probs[lm.tokenizer(variant, add_special_tokens=False)["input_ids"][0]].item() for variant in variants)


@pytest.mark.parametrize("fmt", ["gguf", "steering-vectors", "lm-eval"])
def test_import_sweep_report(real, tmp_path, monkeypatch, fmt):
    import yaml

    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    v = torch.randn(real.hidden_size, generator=torch.Generator().manual_seed(3)) * 3
    store, out = tmp_path / "store", tmp_path / "run"
    imported = run("vectors", "import", write_tool_file(fmt, tmp_path, v), "--name", "mine", "--store", store)
    assert imported.exit_code == 0, imported.output
    swept = run("sweep", REPO_BANK, "--vector", "mine", "--coefficients", "1,4", "--store", store, "--out", out, "--quiet")
    assert swept.exit_code == 0, swept.output
    frame = pl.read_parquet(out / "results.parquet")
    cells = frame.filter(pl.col("role") != "baseline")
    assert set(cells["layer"]) == {BLOCK + 1} and set(cells["injection"]) == {"vector-add"} and set(cells["scaling"]) == {"coefficient"}
    assert sorted(cells["control_kind"].drop_nulls().unique()) == ["negated", "random-direction"]
    bank = yaml.safe_load(open(REPO_BANK))
    for q in bank["questions"]:
        for coefficient in (1.0, 4.0):
            row = cells.filter((pl.col("question_id") == q["id"]) & (pl.col("role") == "relevant")
                               & (pl.col("strength") == coefficient)).row(0, named=True)
            expected = first_token_p(real, q["prompt"], q["correct"], coefficient * v)
            assert math.isclose(row["p_correct"], expected, rel_tol=1e-4), (q["id"], coefficient)
    report = run("report", out, "--format", "json")
    assert report.exit_code == 0, report.output
    summary = json.loads(report.stdout)
    assert summary["header"]["subject"] == "the vector 'mine'"
    relevant = cells.filter(pl.col("role") == "relevant")
    for question in summary["questions"]:
        rows = relevant.filter(pl.col("question_id") == question["question_id"]).to_dicts()
        wrong = sum(1 for r in rows if math.copysign(1, r["strength"]) * r["log_improvement"] < 0)
        assert question["anti_steerable"] == pytest.approx(wrong / len(rows))
    kinds = {k["kind"]: k for k in summary["headline"]["by_kind"]}
    assert set(kinds) == {"relevant", "negated", "random-direction"}
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["vector"]["source"]["format"] == fmt and run_json["vector"]["source"]["layer_map"] == {str(BLOCK): BLOCK + 1}
    assert run_json["settings"]["vector_sha256"] == run_json["vector"]["sha256"]


def test_refusals(real, tmp_path, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    store = tmp_path / "store"
    wide = tmp_path / "wide.pt"
    torch.save({3: torch.ones(real.hidden_size + 1)}, wide)
    one_line_error(run("vectors", "import", wide, "--name", "w", "--store", store), "577 wide", "576")
    hinted = tmp_path / "hint.gguf"
    repeng_export_gguf({3: np.ones(real.hidden_size, dtype=np.float32)}, "gemma3", hinted)
    one_line_error(run("vectors", "import", hinted, "--name", "h", "--store", store), "model_hint 'gemma3'", "'llama'")
    assert run("vectors", "import", hinted, "--name", "h", "--store", store, "--ignore-model-hint").exit_code == 0
    deep = tmp_path / "deep.pt"
    torch.save({40: torch.ones(real.hidden_size)}, deep)
    one_line_error(run("vectors", "import", deep, "--name", "d", "--store", store), "layer 41", "1..30")
    one_line_error(run("sweep", REPO_BANK, "--vector", "nope", "--store", store), "no vector named 'nope'")
    one_line_error(run("sweep", REPO_BANK, "--coefficients", "1"), "--coefficients: applies to --vector")
    one_line_error(run("sweep", REPO_BANK, "--vector", "h", "--coefficients", "1", "--strengths", "1", "--store", store),
                   "give one")
    one_line_error(run("sweep", REPO_BANK, "--injection", "vector-add", "--store", store), "--vector NAME")
    one_line_error(run("sweep", REPO_BANK, "--vector", "h", "--injection", "actadd", "--store", store), "--injection actadd")
    one_line_error(run("sweep", REPO_BANK, "--vector", "h", "--layers", "8", "--store", store, "--out", tmp_path / "r"),
                   "no direction at layer 8", "4")
    assert not (tmp_path / "r").exists()
    one_line_error(run("vectors", "export", "h", "--out", tmp_path / "x.txt", "--store", store), "neither .gguf")
    one_line_error(run("vectors", "export", "--out", tmp_path / "x.gguf", "--store", store), "one of them")
    one_line_error(run("vectors", "export", "h", "--layers", "4-x", "--out", tmp_path / "x.gguf", "--store", store),
                   "--layers: malformed '4-x'")


def test_export_engram_and_build(real, tmp_path, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    store = tmp_path / "store"
    source = tmp_path / "s.txt"
    source.write_text("Pheochromocytoma is treated first with alpha blockade, then beta blockade, before surgery.")
    assert run("build", source, "--layers", "8,16", "--chunks", "4", "--store", store).exit_code == 0
    out = tmp_path / "e.gguf"
    exported = run("vectors", "export", "--engram", "s", "--out", out, "--model-hint", "llama", "--store", store)
    assert exported.exit_code == 0, exported.output
    from engram_eval.engram.files import StoreFiles
    from engram_eval.vectors.formats import read_vector

    (path,) = StoreFiles(store).paths()
    layers, _ = StoreFiles(store).read_layers(path)
    back = read_vector(out)
    assert back.layers == [8, 16]
    for layer in (8, 16):
        assert torch.allclose(back.directions[layer], torch.from_numpy(layers[layer]).float().mean(dim=0))
    pairs = tmp_path / "pairs.yaml"
    pairs.write_text("pairs:\n  - {positive: Ice is cold., negative: Ice is hot.}\n")
    built = run("vectors", "build", "--pairs", pairs, "--name", "t", "--layers", "8", "--store", store)
    assert built.exit_code == 0, built.output
    assert run("vectors", "export", "t", "--out", tmp_path / "t.safetensors", "--store", store).exit_code == 0
    assert read_vector(tmp_path / "t.safetensors").source["format"] == "engram-eval"
    from engram_eval.vectors.caa import ContrastPair, build_caa
    from engram_eval.vectors.store import VectorStore

    one_line_error(run("vectors", "build", "--pairs", pairs, "--name", "t", "--store", store), "already stored")
    assert run("vectors", "build", "--pairs", pairs, "--name", "t", "--layers", "8,30", "--read", "mean", "--store", store,
               "--force").exit_code == 0
    library = build_caa(real, [ContrastPair("Ice is cold.", "Ice is hot.")], [8, 30], "mean")
    stored = VectorStore(store).load("t").vector
    assert all(torch.allclose(stored.directions[layer], library.directions[layer], atol=1e-5) for layer in (8, 30))
    one_line_error(run("vectors", "export", "t", "--out", tmp_path / "t.safetensors", "--store", store), "exists", "--force")
    assert run("vectors", "export", "t", "--layers", "30", "--out", tmp_path / "t.safetensors", "--store", store,
               "--force").exit_code == 0
    assert read_vector(tmp_path / "t.safetensors").layers == [30]
    bad = tmp_path / "bad.yaml"
    bad.write_text("pairs:\n  - {positive: only one side}\n")
    one_line_error(run("vectors", "build", "--pairs", bad, "--name", "b", "--store", store), "pair 1", "exactly")


def test_import_options(real, tmp_path):
    store = tmp_path / "store"
    v = np.arange(real.hidden_size, dtype=np.float32)
    np.save(tmp_path / "v.npy", v)
    ok = run("vectors", "import", tmp_path / "v.npy", "--layer", "12", "--format", "npy", "--name", "plain", "--store", store)
    assert ok.exit_code == 0, ok.output
    from engram_eval.vectors.store import VectorStore

    stored = VectorStore(store).load("plain").vector
    assert stored.layers == [12] and torch.equal(stored.directions[12], torch.from_numpy(v))
    one_line_error(run("vectors", "import", tmp_path / "v.npy", "--layer", "12", "--name", "plain", "--store", store),
                   "already stored", "--force")
    np.save(tmp_path / "v.npy", 2 * v)
    assert run("vectors", "import", tmp_path / "v.npy", "--layer", "3", "--name", "plain", "--store", store, "--force").exit_code == 0
    assert VectorStore(store).load("plain").vector.layers == [3]
    one_line_error(run("vectors", "import", hinted_path(tmp_path, real), "--layer", "3", "--name", "g", "--store", store),
                   "--layer: gguf files name their layers")
    listing = run("vectors", "ls", "--store", store)
    assert listing.exit_code == 0 and "plain" in listing.stdout and "npy" in listing.stdout
    hinted = tmp_path / "hint.gguf"
    repeng_export_gguf({3: np.ones(real.hidden_size, dtype=np.float32)}, "qwen2", hinted)
    one_line_error(run("vectors", "import", hinted, "--name", "h", "--store", store), "model_hint 'qwen2'")
    assert run("vectors", "import", hinted, "--name", "h", "--store", store, "--ignore-model-hint").exit_code == 0


def hinted_path(folder, lm):
    path = folder / "layered.gguf"
    repeng_export_gguf({3: np.ones(lm.hidden_size, dtype=np.float32)}, "llama", path)
    return path
