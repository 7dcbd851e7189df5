from engram_eval.report.summary import load_run, summarize


def test_runs_of_models_of_different_depth_line_up_by_relative_depth(tiny_model_dir, shallow_model_dir, tiny_bank, tmp_path):
    import json as json_module

    from click.testing import CliRunner

    from engram_eval.cli import cli

    def sweep_cli(model, out, layers):
        args = ["sweep", tiny_bank, "--model", model, "--layers", layers, "--strengths", "1,8", "--chunks", "4", "--out", out,
                "--store", tmp_path / "store", "--quiet"]
        assert CliRunner().invoke(cli, [str(a) for a in args]).exit_code == 0

    sweep_cli(tiny_model_dir, tmp_path / "deep", "2,4")
    sweep_cli(shallow_model_dir, tmp_path / "shallow", "1,2")
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "deep"), str(tmp_path / "shallow"), "--format", "json"])
    assert result.exit_code == 0, result.output
    deep, shallow = json_module.loads(result.stdout)["runs"]
    assert (deep["layers"], deep["depths"], shallow["layers"], shallow["depths"]) == ([2, 4], [0.5, 1.0], [1, 2], [0.5, 1.0])
    for run, path in ((deep, tmp_path / "deep"), (shallow, tmp_path / "shallow")):
        single = summarize(*load_run(path))
        assert run["question_flip_rate"] == single["headline"]["question_flip_rate"]
        assert run["controls"] == {c["kind"]: {"verdict": c["verdict"], "p_value": c["p_value"], "mean_difference": c["mean_difference"]}
                                   for c in single["controls"]}
        assert run["heatmaps"]["relevant"]["flip"] == single["heatmaps"]["relevant"]["flip"]
    markdown = CliRunner().invoke(cli, ["report", str(tmp_path / "deep"), str(tmp_path / "shallow"), "--format", "markdown"]).stdout
    assert "| layers (relative depth) | L2 (0.50), L4 (1.00) | L1 (0.50), L2 (1.00) |" in markdown
    other_bank = tmp_path / "other"
    other_bank.mkdir()
    from conftest import write_tiny_bank
    bank = write_tiny_bank(other_bank, {"q9": ("The antidote is", [" dantrolene"], [" cooling"])})
    args = ["sweep", bank, "--model", tiny_model_dir, "--layers", "2", "--strengths", "1", "--chunks", "4", "--out", tmp_path / "o",
            "--store", tmp_path / "store", "--quiet"]
    assert CliRunner().invoke(cli, [str(a) for a in args]).exit_code == 0
    refused = CliRunner().invoke(cli, ["report", str(tmp_path / "deep"), str(tmp_path / "o")])
    assert refused.exit_code == 2 and "the runs use different banks" in refused.stderr and "--allow-different-banks" in refused.stderr
    assert CliRunner().invoke(cli, ["report", str(tmp_path / "deep"), str(tmp_path / "o"), "--allow-different-banks"]).exit_code == 0
