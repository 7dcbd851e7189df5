"""The spec: frozen values checked once, the run's identity derived from them with the fields run.json always had."""

import ast
import hashlib
import json
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from engram_eval.core.errors import EngramEvalError
from engram_eval.run.settings import SweepSettings
from engram_eval.core.spec import Execution, Extraction, Grid, Method, RayOptions, SweepSpec

REPO = Path(__file__).resolve().parents[1]
IDENTITY = dict(model="m", model_fingerprint="f" * 64, bank="b", bank_sha256="s" * 64, questions=["q1", "q2"])


def test_the_spec_module_imports_no_torch_nor_anything_above_the_core():
    for module in ("spec", "registry"):
        tree = ast.parse((REPO / f"engram_eval/core/{module}.py").read_text())
        imported = {(node.level, node.module) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {(0, alias.name) for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        local = {name for level, name in imported if level}
        assert local <= {"errors", "registry"}, (module, local)
        assert not any(name and name.split(".")[0] in ("torch", "transformers", "polars") for level, name in imported if not level)


def test_settings_derived_from_the_spec_are_the_fields_run_json_always_had():
    spec = SweepSpec(Grid((4, 1), (3.0, 0.5), (16,)), Method("add", "per-chunk", "sequence", "both", True),
                     Extraction("pca", 1, 64, 100))
    settings = SweepSettings.of(spec, **IDENTITY)
    identity = {key: value for key, value in IDENTITY.items() if key != "questions"}
    expected = {**identity, "layers": [4, 1], "strengths": [3.0, 0.5], "chunks": 16, "scoring": "sequence", "injection": "add",
                "questions": ["q1", "q2"], "max_tokens": 100, "pooling": "pca", "skip_tokens": 1, "window": 64, "scaling": "per-chunk", "context": "both",
                "record_attention": True}
    assert settings.record() == expected and list(settings.record()) == list(expected)  # the order run.json has
    assert settings.run_id == hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:12]
    assert settings.flat() == {**expected, "positions": "all", "learn_objective": "reconstruct", "learn_steps": 200,
                                "learn_lr": 0.01, "learn_seed": 0, "learn_probes": None, "samples": 0, "sample_seed": 0,
                                "reextract": False, "prefix_at": "after-bos", "vector": None,
                                "vector_sha256": None}  # later fields at their defaults: unrecorded
    scoped = SweepSettings.of(SweepSpec(spec.grid, Method("actadd", positions="last"), spec.extraction), **IDENTITY)
    assert scoped.record()["positions"] == "last" and SweepSettings.from_record(scoped.record()) == scoped
    assert SweepSettings.from_record(settings.record()) == settings and scoped.run_id != SweepSettings.of(
        SweepSpec(spec.grid, Method("actadd"), spec.extraction), **IDENTITY).run_id
    grid = SweepSettings.of(SweepSpec(Grid(chunks=(8, 16))), **IDENTITY)
    assert grid.flat()["chunks"] == [8, 16] and grid.chunk_list == [8, 16]  # one k is an int, a chunk grid a list, as before
    assert settings.spec == SweepSpec(spec.grid, spec.method, spec.extraction, ("q1", "q2"))


def test_the_seed_defaults_and_the_flat_form():
    spec = SweepSpec.build(layers=[8], strengths=[1.0], chunks=4, scaling="per-chunk", questions=["q1"])
    assert spec == SweepSpec(Grid((8,), (1.0,), (4,)), Method(scaling="per-chunk"), Extraction(), ("q1",))
    assert Method() == Method("prefix", "global", "first-token", "with", False) and Extraction().is_seed
    assert SweepSpec().grid == Grid((8, 12, 16, 20, 24), (0.5, 1.0, 2.0, 5.0, 10.0, 20.0), (16,))
    assert spec.with_layers([2, 3]).grid.layers == (2, 3)
    with pytest.raises(FrozenInstanceError):
        spec.grid.layers = (1,)


@pytest.mark.parametrize("spec,message", [
    (SweepSpec.build(injection="actadd", scaling="per-chunk"),
     "--scaling: applies to prefix and add injection; actadd scales its direction by the residual stream's own norm"),
    (SweepSpec.build(scaling="local"), "--scaling: unknown 'local' (one of: global, per-chunk)"),
    (SweepSpec.build(context="maybe"), "--context: unknown 'maybe' (one of: with, without, both)"),
    (SweepSpec.build(scoring="best"), "--scoring: unknown 'best' (one of: first-token, sequence, sequence-max, sequence-mean)"),
    (SweepSpec.build(injection="steer"), "--injection: unknown 'steer' (one of: prefix, add, actadd, vector-add, vector-clamp)"),
    (SweepSpec.build(chunks=[8, 8]), "--chunks: 8 is repeated"),
    (SweepSpec.build(chunks=[16], extraction=Extraction(window=8)), "--window: 8 tokens is smaller than k = 16"),
    (SweepSpec.build(extraction=Extraction(skip_tokens=-1)), "--skip-tokens: must be at least 0 (got -1)"),
])
def test_check_is_every_validation_with_the_command_lines_message(spec, message):
    with pytest.raises(EngramEvalError) as error:
        spec.check()
    assert str(error.value) == message


def test_layers_are_checked_once_the_depth_is_known():
    spec = SweepSpec.build(layers=[0, 30])
    assert spec.check() is spec  # no depth yet: the layers wait
    assert spec.check(30) is spec
    with pytest.raises(EngramEvalError, match=r"^--layers: layer 30 is out of range; valid layers are 0\.\.29"):
        spec.check(29)


@pytest.mark.parametrize("execution,message", [
    (Execution(batch_size=0), "--batch-size: '0' is not 'auto' or a whole number >= 1"),
    (Execution(threads=0), "--threads: must be at least 1 (got 0)"),
    (Execution(ray=RayOptions(workers=0)), "--workers: must be at least 1 (got 0)"),
    (Execution(ray=RayOptions(threads_per_worker=0)), "--threads-per-worker: must be at least 1 (got 0)"),
])
def test_execution_checks(execution, message):
    with pytest.raises(EngramEvalError) as error:
        execution.check()
    assert str(error.value) == message
    assert Execution(batch_size=3, ray=RayOptions(workers=2)).check().batch_size == 3
