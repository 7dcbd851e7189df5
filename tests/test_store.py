
import pytest
import torch
from safetensors import safe_open

from engram_eval import __version__
from engram_eval.core.errors import EngramEvalError
from engram_eval.engram.files import engram_key, text_sha256
from engram_eval.engram.store import EngramStore
from reference import reference_engram

TEXT = "Alpha blockers first, then beta blockers. The tumor releases adrenaline."


def test_store_round_trip_and_metadata(tiny, tmp_path):
    store = EngramStore(tmp_path)
    stored, status = store.ensure(tiny, "topic", TEXT, layers=[0, 2], chunks=4)
    assert status == "built"
    n = len(tiny.tokenizer(TEXT)["input_ids"])
    key = engram_key(tiny.fingerprint, text_sha256(TEXT), 4, n)
    assert stored.path == tmp_path / f"topic.{key}.safetensors"
    with safe_open(stored.path, framework="pt") as f:
        assert sorted(f.keys()) == ["layer.0", "layer.2"]
        meta = f.metadata()
        for layer in (0, 2):
            tensor = f.get_tensor(f"layer.{layer}")
            assert tensor.dtype == torch.float32 and tensor.shape == (4, 32)
            assert torch.allclose(tensor, reference_engram(tiny.model, tiny.tokenizer, TEXT, layer, k=4), atol=1e-5)
    assert {k: meta[k] for k in ("model", "model_fingerprint", "source_name", "source_sha256", "n_tokens", "chunks",
                                 "pooling", "layers", "truncated", "engram_eval_version")} == {
        "model": tiny.name, "model_fingerprint": tiny.fingerprint, "source_name": "topic",
        "source_sha256": text_sha256(TEXT), "n_tokens": str(n), "chunks": "4", "pooling": "mean", "layers": "0,2",
        "truncated": "false", "engram_eval_version": __version__}
    assert meta["created_at"].endswith("+00:00")
    loaded = store.load(stored.path)
    assert all(torch.equal(loaded.engram.layers[l], stored.engram.layers[l]) for l in (0, 2))


def test_rebuild_is_a_no_op_unless_forced(tiny, tmp_path):
    store = EngramStore(tmp_path)
    first, _ = store.ensure(tiny, "topic", TEXT, layers=[1], chunks=4)
    before = first.path.stat().st_mtime_ns
    again, status = store.ensure(tiny, "topic", TEXT, layers=[1], chunks=4)
    assert (status, again.path, again.path.stat().st_mtime_ns) == ("cached", first.path, before)
    _, status = store.ensure(tiny, "topic", TEXT, layers=[1], chunks=4, force=True)
    assert status == "rebuilt"
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no temporary files left


def test_missing_layers_are_added_to_the_same_file(tiny, tmp_path):
    store = EngramStore(tmp_path)
    first, _ = store.ensure(tiny, "topic", TEXT, layers=[1], chunks=4)
    second, status = store.ensure(tiny, "topic", TEXT, layers=[3], chunks=4)
    assert status == "rebuilt" and second.path == first.path and sorted(second.engram.layers) == [1, 3]


def test_different_chunks_or_text_give_different_files(tiny, tmp_path):
    store = EngramStore(tmp_path)
    a, _ = store.ensure(tiny, "topic", TEXT, layers=[1], chunks=4)
    b, _ = store.ensure(tiny, "topic", TEXT, layers=[1], chunks=8)
    c, _ = store.ensure(tiny, "topic", TEXT + " More.", layers=[1], chunks=4)
    assert len({a.path, b.path, c.path}) == 3


def test_truncated_file_is_reported_with_the_path(tiny, tmp_path):
    store = EngramStore(tmp_path)
    stored, _ = store.ensure(tiny, "topic", TEXT, layers=[1], chunks=4)
    data = stored.path.read_bytes()
    stored.path.write_bytes(data[: len(data) - 40])
    with pytest.raises(EngramEvalError) as error:
        store.ensure(tiny, "topic", TEXT, layers=[1], chunks=4)
    assert str(error.value).startswith(f"store file {stored.path} is corrupt or truncated (")
    assert str(error.value).endswith(f"; remove it with `engram-eval store rm {stored.key} --store {tmp_path}` "
                                     "(the next build or sweep rebuilds it)")


def test_flipped_bits_fail_the_checksum(tiny, tmp_path):
    store = EngramStore(tmp_path)
    stored, _ = store.ensure(tiny, "topic", TEXT, layers=[1], chunks=4)
    data = bytearray(stored.path.read_bytes())
    data[-3] ^= 0xFF
    stored.path.write_bytes(bytes(data))
    with pytest.raises(EngramEvalError) as error:
        store.load(stored.path)
    assert str(error.value) == (f"store file {stored.path} is corrupt (checksum mismatch); remove it with "
                                f"`engram-eval store rm {stored.key} --store {tmp_path}` (the next build or sweep rebuilds it)")


def test_engram_of_another_model_is_refused(tiny, tmp_path):
    store = EngramStore(tmp_path)
    stored, _ = store.ensure(tiny, "topic", TEXT, layers=[1], chunks=4)
    store.save(stored.engram, {**stored.metadata, "model": "other-model", "model_fingerprint": "f" * 64}, stored.path)
    with pytest.raises(EngramEvalError) as error:
        store.ensure(tiny, "topic", TEXT, layers=[1], chunks=4)
    assert str(error.value) == (f"store file {stored.path} was built with model other-model (ffffffffffff), "
                                f"not {tiny.name} ({tiny.short_fingerprint})")


def test_find_by_name_or_key(tiny, tmp_path):
    store = EngramStore(tmp_path)
    stored, _ = store.ensure(tiny, "topic", TEXT, layers=[1], chunks=4)
    assert store.find("topic") == [stored.path]
    assert store.find(stored.key[:8]) == [stored.path]
    assert store.find("nothing") == []


@pytest.mark.real_model
def test_real_model_store_file(real, tmp_path):
    from pathlib import Path
    text = (Path(__file__).parents[1] / "questions/sources/tca.txt").read_text()
    stored, _ = EngramStore(tmp_path).ensure(real, "tca", text, layers=list(range(31)), chunks=16)
    with safe_open(stored.path, framework="pt") as f:
        assert len(f.keys()) == 31 and f.get_tensor("layer.20").shape == (16, 576)
        assert f.metadata()["model"] == "smollm2-135m" and f.metadata()["hidden_size"] == "576"
        assert torch.allclose(f.get_tensor("layer.20"), reference_engram(real.model, real.tokenizer, text, 20), rtol=1e-4, atol=1e-4)


def test_force_rebuild_keeps_the_union_of_layers(tiny, tmp_path):
    store = EngramStore(tmp_path)
    store.ensure(tiny, "topic", TEXT, layers=[0, 1, 2, 3, 4], chunks=4)
    rebuilt, status = store.ensure(tiny, "topic", TEXT, layers=[1], chunks=4, force=True)
    assert status == "rebuilt" and sorted(rebuilt.engram.layers) == [0, 1, 2, 3, 4]
    assert store.load(rebuilt.path).metadata["layers"] == "0,1,2,3,4"


def test_a_source_shorter_than_k_records_its_padded_chunks(tiny, tmp_path):
    from engram_eval.engram.store import engram_warnings

    short = "alpha beta"
    n = len(tiny.tokenizer(short)["input_ids"])
    stored, _ = EngramStore(tmp_path).ensure(tiny, "short", short, layers=[1], chunks=8)
    assert stored.metadata["padded_chunks"] == str(8 - n)
    assert (f"source 'short' has {n} tokens, fewer than k = 8: {8 - n} of its chunks repeat the last token's state"
            in engram_warnings("short", stored))
    long, _ = EngramStore(tmp_path).ensure(tiny, "topic", TEXT, layers=[1], chunks=4)
    assert long.metadata["padded_chunks"] == "0"


def test_gc_keeps_what_runs_reference_and_removes_the_rest(tiny, tmp_path):
    import json

    from engram_eval.engram.files import run_engram_keys

    store = EngramStore(tmp_path / "store")
    kept, _ = store.ensure(tiny, "topic", TEXT, layers=[1], chunks=4)
    dropped, _ = store.ensure(tiny, "other", TEXT + " Again.", layers=[1], chunks=4)
    (tmp_path / "runs/a").mkdir(parents=True)
    (tmp_path / "runs/a/run.json").write_text(json.dumps({"engram_keys": {"topic": kept.key}}))
    stale = tmp_path / "store/.tmp-999999999-x.safetensors"  # no such pid
    stale.write_bytes(b"partial")
    assert run_engram_keys([tmp_path / "runs"]) == {kept.key}
    assert store.unreferenced({kept.key}) == [dropped.path] and store.stale_temporaries() == [stale]


def test_the_seed_extraction_keeps_its_key_and_every_variant_gets_its_own(tiny, tmp_path):
    import hashlib

    from engram_eval.engram.extraction import Extraction

    store = EngramStore(tmp_path)
    n = len(tiny.tokenizer(TEXT)["input_ids"])
    seed, _ = store.ensure(tiny, "topic", TEXT, layers=[1], chunks=4)
    assert seed.key == hashlib.sha256(f"{tiny.fingerprint}|{text_sha256(TEXT)}|4|{n}".encode()).hexdigest()[:16]
    variants = [Extraction(pooling="last"), Extraction(skip_tokens=1), Extraction(window=8), Extraction(pooling="pca", skip_tokens=1)]
    keys = {seed.key}
    for extraction in variants:
        (stored, _), = store.ensure_all(tiny, "topic", TEXT, [1], [4], extraction).values()
        keys.add(stored.key)
        meta = stored.metadata
        assert (meta["pooling"], meta["skip_tokens"], meta["window"]) == (
            extraction.pooling, str(extraction.skip_tokens), "none" if extraction.window is None else str(extraction.window))
        assert meta["windows"] == str(-(-n // extraction.window) if extraction.window else 1)
        assert store.load(stored.path).engram.extraction == Extraction(**{**extraction.__dict__, "max_tokens": 2048})
    assert len(keys) == 5
