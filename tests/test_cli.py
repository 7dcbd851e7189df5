import json
from pathlib import Path

import click
import polars as pl
import pytest
from click.testing import CliRunner

from engram_eval.cli import cli
from engram_eval.cli.docs import _commands, cli_reference

REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {message}\n"
    assert "Traceback" not in result.output


def test_every_command_and_option_is_documented():
    for path in _commands(cli, []):
        command = cli
        for name in path:
            command = command.commands[name]
        assert command.help, path
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("help", "version"):
                assert param.help, f"{' '.join(path)} {param.opts}"


def test_cli_choices_match_the_library():
    from engram_eval.core.registry import INJECTIONS, POOLINGS, SCORINGS
    from engram_eval.core.spec import CONTEXTS, SCALINGS
    options = {p.name: p for p in cli.commands["sweep"].params}
    assert tuple(options["scoring"].type.choices) == SCORINGS.names() and tuple(options["injection"].type.choices) == INJECTIONS.names()
    assert tuple(options["scaling"].type.choices) == SCALINGS and tuple(options["pooling"].type.choices) == POOLINGS.names()
    assert tuple(options["context"].type.choices) == CONTEXTS
    assert tuple({p.name: p for p in cli.commands["build"].params}["pooling"].type.choices) == POOLINGS.names()


def test_docs_cli_md_is_generated_from_help():
    assert (REPO / "docs/cli.md").read_text() == cli_reference(), "run `make docs`"


def test_build_store_ls_and_show(tiny_model_dir, tmp_path):
    source = tmp_path / "my source.txt"
    source.write_text("Alpha blockers first, then beta blockers.")
    result = run("build", source, "--model", tiny_model_dir, "--chunks", "4", "--layers", "1-3", "--store", tmp_path / "store")
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "store").glob("*.safetensors")
    assert path.name.startswith("my_source.") and "built" in result.stdout
    again = run("build", source, "--model", tiny_model_dir, "--chunks", "4", "--layers", "1-3", "--store", tmp_path / "store")
    assert "cached" in again.stdout
    listing = run("store", "ls", "--store", tmp_path / "store").stdout
    assert "my source" in listing and "1-3" in listing
    shown = run("store", "show", "my source", "--store", tmp_path / "store")
    assert shown.exit_code == 0 and "tensors_sha256" in shown.stdout
    from safetensors.torch import load_file
    for name, tensor in load_file(path).items():
        assert f"{tensor.norm(dim=1).mean().item():.4f}" in shown.stdout, name


def test_long_source_is_truncated_with_a_warning(tiny_model_dir, tmp_path):
    source = tmp_path / "long.txt"
    source.write_text("alpha beta gamma " * 40)
    result = run("build", source, "--model", tiny_model_dir, "--chunks", "4", "--layers", "1", "--max-tokens", "8", "--store", tmp_path / "s")
    assert result.exit_code == 0
    assert result.stderr == "warning: source 'long' truncated to 8 tokens (--max-tokens)\n"
    assert "8 (truncated)" in result.stdout
    (path,) = (tmp_path / "s").glob("*.safetensors")
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        assert (f.metadata()["truncated"], f.metadata()["n_tokens"], f.metadata()["max_tokens"]) == ("true", "8", "8")


def test_sweep_report_and_check_from_the_command_line(tiny_model_dir, tiny_bank, tmp_path):
    out = tmp_path / "run"
    result = run("sweep", tiny_bank, "--model", tiny_model_dir, "--layers", "1,2", "--strengths", "1,4", "--chunks", "4",
                 "--out", out, "--store", tmp_path / "store", "--questions", "q1,q3", "--quiet")
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(out / "results.parquet")
    assert frame["question_id"].unique().sort().to_list() == ["q1", "q3"] and frame.height == 2 * (1 + 4 * 4)
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["status"] == "complete" and run_json["cells"]["total"] == 34
    assert set(run_json["engram_keys"]) == {"topic", "stars", "noise", "anti"} and "torch" in run_json["versions"]
    table = run("report", out).stdout
    assert "Negative controls" in table and "Semantic sink" in table
    data = json.loads(run("report", out, "--format", "json").stdout)
    assert data["header"]["cells"] == 34
    assert "## Headline" in run("report", out, "--format", "markdown").stdout
    assert run("report", out, "--format", "html").stdout.strip() == str(out / "report.html")


@pytest.mark.parametrize("args,message", [
    (["build", "missing.txt"], "missing.txt: source file not found"),
    (["build"], "build: give source files, or --bank BANK.yaml"),
    (["build", "empty.txt"], "empty.txt: source file is empty"),
    (["build", "latin1.txt"], "latin1.txt: source file is not UTF-8 text"),
    (["build", "ok.txt", "--chunks", "0"], "--chunks: must be at least 1 (got 0)"),
    (["build", "ok.txt", "--layers", "7", "--model", "{tiny}"], "--layers: layer 7 is out of range; valid layers are 0..4 (0 = embedding output, 4 = last)"),
    (["build", "ok.txt", "--model", "nope"], "--model: 'nope' is not an embedded model (smollm2-135m, gemma3-270m), a local model directory, a .gguf file or a hub id"),
    (["sweep", "{bank}", "--strengths", "1,0"], "--strengths: 0.0 is not allowed; strengths must be finite and not 0 (negative ones subtract the engram, with add and actadd injection)"),
    (["sweep", "{bank}", "--strengths", "1,nan"], "--strengths: nan is not allowed; strengths must be finite and not 0 (negative ones subtract the engram, with add and actadd injection)"),
    (["sweep", "{bank}", "--strengths", "inf"], "--strengths: inf is not allowed; strengths must be finite and not 0 (negative ones subtract the engram, with add and actadd injection)"),
    (["sweep", "{bank}", "--strengths", "1,,2"], "--strengths: malformed '1,,2' (expected numbers like '0.5,1,2,5,10,20')"),
    (["sweep", "{bank}", "--batch-size", "0"], "--batch-size: '0' is not 'auto' or a whole number >= 1"),
    (["generate", "nowhere", "--batch-size", "-2"], "--batch-size: '-2' is not 'auto' or a whole number >= 1"),
    (["bench", "--batch-size", "many"], "--batch-size: 'many' is not 'auto' or a whole number >= 1"),
    (["bench", "--ray", "auto", "--random-init", "ok.txt"], "--ray: not with --random-init (workers load --model's weights by name)"),
    (["sweep", "{bank}", "--chunks", "8,x"], "--chunks: malformed '8,x' (expected whole numbers like '16' or '8,16,32,64,128')"),
    (["compare", "ok.txt", "ok.txt", "--depths", "half"], "--depths: malformed 'half' (expected fractions like '0.25,0.5,0.75')"),
    (["sweep", "{bank}", "--questions", "zz"], "--questions: no question 'zz' in {bank} (known: q1, q2, q3)"),
    (["sweep", "{bank}", "--layers", "1-9", "--model", "{tiny}"], "--layers: layer 9 is out of range; valid layers are 0..4 (0 = embedding output, 4 = last)"),
    (["report", "nowhere"], "nowhere: no results.parquet (run `engram-eval sweep` with --out nowhere first)"),
    (["store", "show", "ghost", "--store", "nostore"], "store nostore: no such folder (build engrams with `engram-eval build`, or pass --store)"),
    (["store", "ls", "--store", "nostore"], "store nostore: no such folder (build engrams with `engram-eval build`, or pass --store)"),
    (["store", "show", "ghost", "--store", "."], "store .: no engram named 'ghost' (see `engram-eval store ls`)"),
    (["store", "rm", "ghost", "--store", "."], "store .: no engram named 'ghost' (see `engram-eval store ls`)"),
    (["store", "gc", "--store", ".", "--runs", "nowhere"], "--runs: nowhere is not a folder"),
    (["sweep", "{bank}", "--injection", "sideways"], "Invalid value for '--injection': 'sideways' is not one of 'prefix', 'add', 'actadd', 'vector-add', 'vector-clamp'."),
    (["sweep", "{bank}", "--pooling", "median"], "Invalid value for '--pooling': 'median' is not one of 'mean', 'last', 'pca', 'learned'."),
    (["sweep", "{bank}", "--scaling", "loud"], "Invalid value for '--scaling': 'loud' is not one of 'global', 'per-chunk'."),
    (["sweep", "{bank}", "--injection", "actadd", "--scaling", "per-chunk"],
     "--scaling: applies to prefix and add injection; actadd scales its direction by the residual stream's own norm"),
    (["sweep", "{bank}", "--window", "8"], "--window: 8 tokens is smaller than k = 16"),
    (["sweep", "{bank}", "--skip-tokens", "-1"], "Invalid value for '--skip-tokens': -1 is not in the range x>=0."),
    (["sweep"], "Missing argument 'BANK'."),
    (["sweep", "{bank}", "--context", "sometimes"], "Invalid value for '--context': 'sometimes' is not one of 'with', 'without', 'both'."),
    (["generate", "nowhere"], "nowhere: no results.parquet (finish the sweep with `engram-eval sweep ... --out nowhere` first)"),
    (["generate", "nowhere", "--cells", "some"], "Invalid value for '--cells': 'some' is not one of 'default', 'all', 'baseline', 'flips'."),
    (["generate", "nowhere", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1 (got 0)"),
    (["build", "ok.txt", "--pooling", "pca", "--model", "{tiny}"], "source 'ok': 2 tokens, at most k = 16: --pooling pca needs more than k (the centred states have rank n - 1)"),
])
def test_bad_input_is_one_line_on_stderr(args, message, tiny_model_dir, tiny_bank, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("empty.txt").write_text("  \n")
    Path("ok.txt").write_text("alpha")
    Path("latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    fill = lambda s: s.replace("{tiny}", str(tiny_model_dir)).replace("{bank}", str(tiny_bank))  # noqa: E731
    one_line_error(run(*[fill(a) for a in args]), fill(message))
    assert not Path("store").exists() and not Path("reports").exists()  # nothing half-written


def test_bench_random_init_builds_the_config_with_the_models_tokenizer(tiny_model_dir, tiny_bank, tmp_path):
    config = tmp_path / "small.config.json"
    config.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 700}))
    result = run("bench", "--model", tiny_model_dir, "--random-init", config, "--bank", tiny_bank, "--layers", "1,3",
                 "--strengths", "1,2", "--loop-cells", "3")
    assert result.exit_code == 0, result.output
    assert "engram-eval bench: random-init small.config.json on cpu (float32" in result.stdout
    assert "4 sources in" in result.stdout and "(51 cells)" in result.stdout and "(3 cells)" in result.stdout


@pytest.mark.parametrize("text,message", [
    (None, "{config}: model config not found"),
    ("{", "{config}: not a usable model config (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ('{"hidden_size": 8}', "{config}: not a usable model config (no model_type: not a Hugging Face config.json)"),
    ('{"model_type": "qwen2", "vocab_size": 10}', "{config}: vocab_size 10 is smaller than the tokenizer's {tokens} tokens"),
])
def test_bench_random_init_refuses_a_bad_config_in_one_line(text, message, tiny, tiny_model_dir, tmp_path):
    config = tmp_path / "model.json"
    if text is not None:
        config.write_text(text)
    result = run("bench", "--model", tiny_model_dir, "--random-init", config)
    one_line_error(result, message.format(config=config, tokens=len(tiny.tokenizer)))


def built_store(tiny_model_dir, tmp_path, *chunks):
    source = tmp_path / "topic.txt"
    source.write_text("Alpha blockers first, then beta blockers. The tumor releases adrenaline; alpha blockade first.")
    for k in chunks:
        assert run("build", source, "--model", tiny_model_dir, "--chunks", k, "--layers", "1,3", "--store", tmp_path / "store").exit_code == 0
    return tmp_path / "store"


def test_store_show_prints_each_layers_chunk_norms_and_largest_share(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    store = built_store(tiny_model_dir, tmp_path, 4)
    shown = run("store", "show", "topic", "--store", store).stdout
    (path,) = store.glob("*.safetensors")
    for name, tensor in load_file(path).items():
        norms = [row.norm().item() for row in tensor]
        share = max(norms) / sum(norms)
        line = next(l for l in shown.splitlines() if l.strip("│ ").startswith(name.split(".")[1] + " "))
        assert f"{norms.index(max(norms))}: {100 * share:.0f}%" in line
        assert sum(c in "▁▂▃▄▅▆▇█" for c in line) == 4 and "█" in line


def test_store_show_with_several_engrams_of_one_name_lists_them_and_asks_for_the_key(tiny_model_dir, tmp_path):
    store = built_store(tiny_model_dir, tmp_path, 4, 8)
    result = run("store", "show", "topic", "--store", store)
    assert result.exit_code == 2 and result.stderr == f"error: store {store}: 2 engrams are named 'topic'; give one of their keys\n"
    keys = [p.name.split(".")[1] for p in sorted(store.glob("*.safetensors"))]
    assert all(key in result.stdout for key in keys)
    assert run("store", "show", keys[0], "--store", store).exit_code == 0


def test_store_ls_marks_a_corrupt_file_and_store_rm_removes_it(tiny_model_dir, tmp_path):
    store = built_store(tiny_model_dir, tmp_path, 4, 8)
    corrupt, healthy = sorted(store.glob("*.safetensors"))
    corrupt.write_bytes(corrupt.read_bytes()[:50])
    listing = run("store", "ls", "--store", store)
    assert listing.exit_code == 0
    rows = [line for line in listing.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 2 and [r for r in rows if "│ corrupt " in r] == [r for r in rows if corrupt.name.split(".")[1] in r]
    key = corrupt.name.split(".")[1]
    assert run("store", "rm", key, "--store", store).stdout == f"removed {corrupt}\n"
    assert list(store.glob("*.safetensors")) == [healthy]
    assert run("store", "rm", "topic", "--store", store).stdout == f"removed {healthy}\n"


def test_store_gc_dry_run_then_removal(tiny_model_dir, tmp_path):
    store = built_store(tiny_model_dir, tmp_path, 4, 8)
    used, unused = sorted(store.glob("*.safetensors"))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/run.json").write_text(json.dumps({"engram_keys": {"topic": used.name.split(".")[1]}}))
    dry = run("store", "gc", "--store", store, "--runs", tmp_path / "runs", "--dry-run")
    assert dry.stdout == f"would remove {unused}\nkeeping {used}\n0 temporary file(s) and 1 engram(s) to remove; 1 engram(s) kept\n"
    assert unused.exists()
    done = run("store", "gc", "--store", store, "--runs", tmp_path / "runs", "--yes")
    assert done.stdout == f"removing {unused}\nkeeping {used}\n0 temporary file(s) and 1 engram(s) removed; 1 engram(s) kept\n"
    assert list(store.glob("*.safetensors")) == [used]


@pytest.mark.real_model
def test_build_warns_once_when_the_first_tokens_chunk_dominates_at_layer_16(real, tmp_path):
    from reference import reference_engram

    source = REPO / "questions/sources/pheo.txt"
    result = run("build", source, "--layers", "8,16", "--store", tmp_path / "store")
    assert result.exit_code == 0, result.output
    norms = reference_engram(real.model, real.tokenizer, source.read_text(), 16).norm(dim=1)
    share = (norms.max() / norms.sum()).item()
    assert share > 0.5 and norms.argmax().item() == 0
    (warning,) = result.stderr.splitlines()
    assert warning == ("warning: one chunk holds more than half of the engram's summed row norms in source 'pheo' at layers 16 "
                       f"(chunk 0; {100 * share:.0f}% at layer 16): a massive activation dominates this engram, so relevant "
                       "and control engrams look alike there")
    anti = REPO / "questions/sources/anti_pheo.txt"
    both = run("build", source, anti, "--layers", "16", "--store", tmp_path / "both")
    anti_norms = reference_engram(real.model, real.tokenizer, anti.read_text(), 16).norm(dim=1)
    anti_share = (anti_norms.max() / anti_norms.sum()).item()
    assert anti_share > 0.5
    (merged,) = both.stderr.splitlines()  # one warning for every dominated source, not one per source
    assert merged == ("warning: one chunk holds more than half of the engram's summed row norms in 2 sources: 'pheo' at layers 16 "
                      f"(chunk 0; {100 * share:.0f}% at layer 16); 'anti_pheo' at layers 16 (chunk 0; {100 * anti_share:.0f}% at "
                      "layer 16): a massive activation dominates these engrams, so relevant and control engrams look alike there")


def test_report_output_writes_each_format_to_the_path_given(tiny_model_dir, tiny_bank, tmp_path):
    out = tmp_path / "run"
    run("sweep", tiny_bank, "--model", tiny_model_dir, "--layers", "1", "--strengths", "1", "--chunks", "4", "--out", out,
        "--store", tmp_path / "store", "--quiet")
    for fmt, name in (("html", "page.html"), ("markdown", "r.md"), ("json", "r.json"), ("table", "r.txt")):
        result = run("report", out, "--format", fmt, "--output", tmp_path / name)
        assert result.exit_code == 0 and result.stdout == f"{tmp_path / name}\n"
    assert (tmp_path / "page.html").read_text().startswith("<!doctype html>") and not (out / "report.html").exists()
    assert (tmp_path / "r.md").read_text() == run("report", out, "--format", "markdown").stdout
    assert json.loads((tmp_path / "r.json").read_text())["header"]["cells"] == 3 * 5
    assert "Negative controls" in (tmp_path / "r.txt").read_text() and "\x1b[" not in (tmp_path / "r.txt").read_text()
    one_line_error(run("report", out, "--output", tmp_path / "nowhere/r.txt"), f"--output: folder {tmp_path / 'nowhere'} does not exist")


def test_sweep_warns_of_bank_mistakes_and_strict_refuses_them_before_the_model_loads(tiny_model_dir, tmp_path):
    from conftest import write_tiny_bank

    bank = write_tiny_bank(tmp_path, {"q1": ("The first drug is", ["alpha"], [" beta"])})
    message = f"{bank}: question 'q1': variant 'alpha' has no leading space after a prompt that ends in a word, so it is scored glued to that word"
    strict = run("sweep", bank, "--model", "no-such-model", "--strict", "--out", tmp_path / "run")
    one_line_error(strict, f"{message} (--strict)")
    assert not (tmp_path / "run").exists()
    result = run("sweep", bank, "--model", tiny_model_dir, "--layers", "1", "--strengths", "1", "--chunks", "4",
                 "--out", tmp_path / "run", "--store", tmp_path / "store", "--quiet")
    assert result.exit_code == 0 and result.stderr.count(message) == 1
