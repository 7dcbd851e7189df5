"""--pooling learned: k input-embedding vectors optimised against the frozen model. The losses are recomputed here from
plain forward passes, the optimisation from a plain AdamW loop."""

import json
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from engram_eval.core.errors import EngramEvalError
from engram_eval.core.spec import Extraction
from engram_eval.engram.extraction import extract_engram
from conftest import TINY_SOURCES, sweep, write_tiny_bank
from reference import reference_engram

TEXT = TINY_SOURCES["topic"]
PROBES = ("Tell me more.", "What is it about?")


def learning(**overrides) -> Extraction:
    return Extraction(pooling="learned", **{"learn_steps": 6, **overrides})


def reference_reconstruct(lm, vectors: torch.Tensor, text: str) -> float:
    """Mean cross-entropy of each source token, predicted from everything before it, vectors first: a loop."""
    ids = lm.tokenizer(text)["input_ids"]
    table = lm.model.get_input_embeddings().weight.detach()
    with torch.no_grad():
        logits = lm.model(inputs_embeds=torch.cat([vectors, table[ids]]).unsqueeze(0)).logits[0].float()
    k = vectors.shape[0]
    return sum(-torch.log_softmax(logits[k - 1 + i], dim=-1)[token].item() for i, token in enumerate(ids)) / len(ids)


def reference_distill(lm, vectors: torch.Tensor, text: str, probes: tuple[str, ...]) -> float:
    """Mean over probe positions of KL(model reading source + blank line + probe || model reading vectors + probe)."""
    table = lm.model.get_input_embeddings().weight.detach()
    source = lm.tokenizer(text)["input_ids"]
    separator = lm.tokenizer.encode("\n\n", add_special_tokens=False)
    total, positions = 0.0, 0
    for probe in probes:
        ids = lm.tokenizer.encode(probe, add_special_tokens=False)
        with torch.no_grad():
            teacher = torch.log_softmax(lm.model(input_ids=torch.tensor([source + separator + ids])).logits[0, -len(ids):].float(), -1)
            student = torch.log_softmax(lm.model(inputs_embeds=torch.cat([vectors, table[ids]]).unsqueeze(0)).logits[0, -len(ids):].float(), -1)
        for i in range(len(ids)):
            total += (teacher[i].exp() * (teacher[i] - student[i])).sum().item()
            positions += 1
    return total / positions


def plain_adamw(lm, initial: torch.Tensor, loss_of, steps: int, lr: float) -> torch.Tensor:
    """The optimisation written out: AdamW (betas 0.9, 0.9, no decay), then rescale to the embedding norm each step."""
    norm = lm.model.get_input_embeddings().weight.detach().float().norm(dim=1).mean()
    vectors = (initial * norm / initial.norm(dim=1).mean()).clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([vectors], lr=lr, betas=(0.9, 0.9), weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(vectors).backward()
        optimizer.step()
        with torch.no_grad():
            vectors *= norm / vectors.norm(dim=1).mean()
    return vectors.detach()


def test_reconstruct_learns_from_the_scaled_chunk_means_with_adamw_and_the_norm_projection(tiny):
    engram = extract_engram(tiny, TEXT, [2], chunks=4, extraction=learning())
    record = engram.learning[2]
    initial = reference_engram(tiny.model, tiny.tokenizer, TEXT, 2, k=4)
    norm = tiny.model.get_input_embeddings().weight.detach().float().norm(dim=1).mean()
    scaled = initial * norm / initial.norm(dim=1).mean()
    assert record.steps == 6 and record.loss_init == pytest.approx(reference_reconstruct(tiny, scaled, TEXT), rel=1e-5)
    ids = torch.tensor(tiny.tokenizer(TEXT)["input_ids"])
    table = tiny.model.get_input_embeddings().weight.detach()

    def loss_of(vectors):
        logits = tiny.model(inputs_embeds=torch.cat([vectors, table[ids]]).unsqueeze(0)).logits[0, 3 : 3 + len(ids)].float()
        return F.cross_entropy(logits, ids)

    expected = plain_adamw(tiny, initial, loss_of, 6, 1e-2)
    assert torch.allclose(engram.layers[2], expected, atol=1e-5)
    assert engram.layers[2].norm(dim=1).mean().item() == pytest.approx(norm.item(), rel=1e-6)  # projected
    assert record.loss_final == pytest.approx(reference_reconstruct(tiny, engram.layers[2], TEXT), rel=1e-5)
    assert record.loss_final < record.loss_init


def test_distill_minimises_the_kl_from_the_model_that_read_the_source(tiny):
    engram = extract_engram(tiny, TEXT, [1, 3], chunks=4, extraction=learning(learn_objective="distill", learn_probes=PROBES))
    for layer in (1, 3):
        record = engram.learning[layer]
        assert record.loss_final == pytest.approx(reference_distill(tiny, engram.layers[layer], TEXT, PROBES), rel=1e-4, abs=1e-6)
        assert record.loss_final < record.loss_init


def test_learning_is_deterministic_and_stops_at_a_plateau(tiny):
    first, second = (extract_engram(tiny, TEXT, [2], chunks=4, extraction=learning(learn_steps=5)) for _ in range(2))
    assert torch.equal(first.layers[2], second.layers[2]) and first.learning == second.learning
    flat = extract_engram(tiny, TEXT, [2], chunks=4, extraction=learning(learn_steps=200, learn_lr=1e-9))
    assert flat.learning[2].steps == 21  # the loss improved by less than 1e-4 over 20 steps: stop after the 21st


def test_the_store_keys_and_records_the_learning_and_store_show_prints_the_losses(tiny, tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from engram_eval.cli import cli
    from engram_eval.engram.store import EngramStore

    store = EngramStore(tmp_path / "store")
    stored, status = store.ensure(tiny, "topic", TEXT, [1, 2], 4, extraction=learning())
    meta = stored.metadata
    assert status == "built" and meta["pooling"] == "learned" and meta["learn_objective"] == "reconstruct"
    assert (meta["learn_steps"], meta["learn_lr"], meta["learn_seed"], meta["learn_probes_sha256"]) == ("6", "0.01", "0", "-")
    for layer in (1, 2):
        assert json.loads(meta["learn_loss_final"])[str(layer)] == stored.engram.learning[layer].loss_final
        assert json.loads(meta["learn_steps_run"])[str(layer)] == 6
    other, _ = store.ensure(tiny, "topic", TEXT, [1, 2], 4, extraction=learning(learn_lr=2e-2))
    mean, _ = store.ensure(tiny, "topic", TEXT, [1, 2], 4)
    assert len({stored.key, other.key, mean.key}) == 3
    assert store.ensure(tiny, "topic", TEXT, [1, 2], 4, extraction=learning())[1] == "cached"
    shown = CliRunner().invoke(cli, ["store", "show", stored.key, "--store", str(tmp_path / "store")], terminal_width=400)
    assert shown.exit_code == 0 and "learn_loss_init" in shown.output and "learn_loss_final" in shown.output
    assert meta["learn_loss_init"] in shown.output and meta["learn_loss_final"] in shown.output


def test_a_sweep_with_learned_engrams_scales_them_by_the_strength_alone(tiny, tmp_path):
    from engram_eval.engram.store import EngramStore
    from engram_eval.steer.injection import scale_engram

    bank = write_tiny_bank(tmp_path)
    result = sweep(tiny, bank, tmp_path / "run", extraction=learning(learn_steps=3), layers=[2], strengths=[1.0, 3.0],
                   questions=["q1"])
    frame = pl.read_parquet(result.results_path)
    assert set(frame["pooling"]) == {"learned"}
    settings = json.loads((tmp_path / "run/run.json").read_text())["settings"]
    assert settings["pooling"] == "learned" and settings["learn_steps"] == 3 and "learn_lr" not in settings  # set fields only
    stored = EngramStore(tmp_path / "store").load(Path(result.run["engram_files"]["topic"]))
    vectors = stored.engram.layers[2]
    assert torch.allclose(scale_engram(vectors, tiny.embedding_norm, 3.0), 3.0 * vectors, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options,message", [
    (dict(extraction=Extraction(learn_steps=5)), "--learn-steps: applies to --pooling learned (this is --pooling mean)"),
    (dict(extraction=learning(learn_steps=0)), "--learn-steps: must be at least 1 (got 0)"),
    (dict(extraction=learning(learn_lr=-1.0)), "--learn-lr: must be finite and > 0 (got -1)"),
    (dict(extraction=learning(window=8)), "--window: does not apply to --pooling learned (its objective runs the whole "
                                          "source, cut at --max-tokens)"),
    (dict(extraction=learning(learn_probes=PROBES)), "--learn-probes: applies to --learn-objective distill"),
    (dict(extraction=learning(), injection="actadd"), "--pooling learned: learned vectors live in the input-embedding space, "
                                                       "and --injection actadd adds a residual-stream direction at layer L; "
                                                       "use prefix or add injection"),
])
def test_bad_learning_settings_are_one_line_before_any_model_work(tiny, tiny_bank, tmp_path, options, message):
    with pytest.raises(EngramEvalError) as error:
        sweep(tiny, tiny_bank, tmp_path / "run", **options)
    assert str(error.value) == message and not (tmp_path / "store").exists()


def test_learn_probes_file_on_the_command_line(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from engram_eval.cli import cli

    source = tmp_path / "topic.txt"
    source.write_text(TEXT)
    (tmp_path / "probes.txt").write_text("\n".join(PROBES) + "\n\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    common = ["build", str(source), "--model", str(tiny_model_dir), "--layers", "2", "--chunks", "4", "--store", str(tmp_path / "s")]
    empty = CliRunner().invoke(cli, [*common, "--pooling", "learned", "--learn-objective", "distill", "--learn-probes",
                                     str(tmp_path / "empty.txt")])
    assert empty.exit_code != 0 and empty.stderr.strip() == f"error: {tmp_path / 'empty.txt'}: --learn-probes file has no probe prompts (one per line)"
    assert not (tmp_path / "s").exists()
    built = CliRunner().invoke(cli, [*common, "--pooling", "learned", "--learn-objective", "distill", "--learn-steps", "2",
                                     "--learn-probes", str(tmp_path / "probes.txt")])
    assert built.exit_code == 0, built.output
    [path] = (tmp_path / "s").glob("*.safetensors")
    from engram_eval.engram.files import StoreFiles, text_sha256
    meta = StoreFiles(tmp_path / "s").read_metadata(path)
    assert meta["learn_probes_sha256"] == text_sha256("\n".join(PROBES)) and meta["learn_steps_run"] == '{"2": 2}'
    bank = write_tiny_bank(tmp_path)
    swept = CliRunner().invoke(cli, ["sweep", str(bank), "--model", str(tiny_model_dir), "--layers", "2", "--strengths", "1",
                                     "--chunks", "4", "--questions", "q1", "--pooling", "learned", "--learn-objective", "distill",
                                     "--learn-steps", "1", "--learn-probes", str(tmp_path / "probes.txt"), "--out",
                                     str(tmp_path / "run"), "--store", str(tmp_path / "s"), "-q"])
    assert swept.exit_code == 0, swept.output
    assert json.loads((tmp_path / "run/run.json").read_text())["settings"]["learn_probes"] == list(PROBES)


@pytest.mark.real_model
def test_on_the_real_model_the_learned_engram_reconstructs_its_source_better_than_the_chunk_means(real):
    from engram_eval.bank.banks import load_bank

    text = load_bank(Path(__file__).resolve().parents[1] / "questions/ci.yaml").sources["pheo"].text
    engram = extract_engram(real, text, [16], chunks=16, extraction=learning(learn_steps=4, max_tokens=96))
    record = engram.learning[16]
    assert record.steps == 4 and record.loss_final < record.loss_init
    ids_text = real.tokenizer.decode(real.tokenizer(text)["input_ids"][:96])
    assert record.loss_final == pytest.approx(reference_reconstruct(real, engram.layers[16], ids_text), rel=2e-3)
