"""The engram store: one content-addressed safetensors file per (model fingerprint, source text, chunks, tokens),
built from a model where it lacks one (the files themselves are `files.StoreFiles`)."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from .._version import __version__
from ..backend.model import LoadedModel
from ..bank.banks import Bank, paraphrase_name
from ..core.errors import EngramEvalError
from ..core.files import atomic_replace
from ..core.locks import FileLock
from ..core.registry import NULL_PREFIXES
from ..core.spec import DEFAULT_MAX_TOKENS, SEED_EXTRACTION, SEED_POOLING, Extraction
from .dominance import dominance, dominance_warning
from .extraction import Engram, extract_engrams, read_after, source_ids
from .files import FORMAT_VERSION, StoreFiles, arrays_sha256, engram_key, probes_sha256, text_sha256, unusable_layer


LAST_BLOCK_OUTPUT = "block-output"  # metadata `last_layer`: the last layer taken before the final norm (actadd's site)


@dataclass
class StoredEngram:
    path: Path
    engram: Engram
    metadata: dict[str, str]

    @property
    def key(self) -> str:
        return self.metadata["key"]

    def restricted(self, layers: list[int]) -> StoredEngram:
        """The same engram with only these layers (what a sweep uses of a file that holds more)."""
        engram = replace(self.engram, layers={layer: self.engram.layers[layer] for layer in layers})
        return StoredEngram(self.path, engram, self.metadata)


class EngramStore(StoreFiles):
    """The store's files, built from a model and loaded as torch tensors for a sweep."""

    def save(self, engram: Engram, metadata: dict[str, str], path: Path) -> dict[str, str]:
        """Atomic: write a temporary file in the store, then rename it over the target -> metadata written."""
        tensors = {f"layer.{layer}": vectors.contiguous() for layer, vectors in engram.layers.items()}
        metadata = {**metadata, "tensors_sha256": arrays_sha256({name: t.numpy() for name, t in tensors.items()})}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EngramEvalError(f"store {self.root}: cannot write ({exc.strerror})") from None
        self.remove_stale_temporaries()

        def write(tmp: Path) -> None:
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())

        try:
            atomic_replace(path, write)
        except EngramEvalError as exc:
            raise EngramEvalError(f"store: {exc}; earlier files are intact") from None
        return metadata

    def load(self, path: Path) -> StoredEngram:
        """Read and verify one engram file (checksum of every tensor)."""
        arrays, metadata = self.read_layers(path)
        window = metadata.get("window", "none")
        extraction = Extraction(pooling=metadata.get("pooling", SEED_POOLING), skip_tokens=int(metadata.get("skip_tokens", 0)),
                                window=None if window == "none" else int(window),
                                max_tokens=int(metadata.get("max_tokens", DEFAULT_MAX_TOKENS)),
                                block_output=metadata.get("last_layer") == LAST_BLOCK_OUTPUT)
        engram = Engram(
            layers={layer: torch.from_numpy(array) for layer, array in arrays.items()},
            n_tokens=int(metadata["n_tokens"]),
            truncated=metadata["truncated"] == "true",
            chunks=int(metadata["chunks"]),
            extraction=extraction,
            windows=int(metadata.get("windows", 1)),
        )
        return StoredEngram(path=path, engram=engram, metadata=metadata)

    def ensure(
        self,
        lm: LoadedModel,
        source_name: str,
        text: str,
        layers: list[int],
        chunks: int,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        force: bool = False,
        extraction: Extraction | None = None,
    ) -> tuple[StoredEngram, str]:
        """Get one engram from the store, building it (or the layers it lacks) when needed -> (engram, status),
        status being 'cached', 'built' or 'rebuilt'."""
        extraction = extraction or Extraction(max_tokens=max_tokens)
        return self.ensure_all(lm, source_name, text, layers, [chunks], extraction, force)[chunks]

    def ensure_all(
        self,
        lm: LoadedModel,
        source_name: str,
        text: str,
        layers: list[int],
        chunks: list[int],
        extraction: Extraction = SEED_EXTRACTION,
        force: bool = False,
        state: tuple[int, ...] | None = None,
    ) -> dict[int, tuple[StoredEngram, str]]:
        """One engram per k; every k that must be built (or extended) comes from the same forward pass. Builders of
        one key take turns (a lock file per key): each re-reads the file under the lock and keeps the layers another
        builder wrote meanwhile. state (--reextract): token ids the source is read after, with a blank line between;
        they run but are not pooled, and their sha256 is part of the key."""
        source_sha = text_sha256(text)
        ids, truncated = source_ids(lm, text, extraction)
        identity, conditioned = source_sha, {}
        if state is not None:
            ids, extraction = read_after(lm, state, ids, extraction)
            state_sha = ids_sha256(state)
            identity = text_sha256(f"{source_sha}|state|{state_sha}")
            conditioned = {"state_sha256": state_sha, "state_tokens": str(len(state))}
        keys = {k: engram_key(lm.fingerprint, identity, k, len(ids), extraction) for k in chunks}
        found: dict[int, tuple[StoredEngram, str]] = {}
        for k in chunks:
            if (cached := self._cached(lm, self.path_for(source_name, keys[k]), layers, force)[0]) is not None:
                found[k] = (cached, "cached")
        pending = [k for k in chunks if k not in found]
        if not pending:
            return found
        created = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EngramEvalError(f"store {self.root}: cannot write ({exc.strerror})") from None
        try:
            with ExitStack() as locks:
                for k in sorted(pending, key=keys.__getitem__):
                    locks.enter_context(FileLock(self.root / f".lock-{keys[k]}", f"store key {keys[k]}", wait=True))
                self._build_pending(lm, source_name, ids, truncated, source_sha, layers, pending, keys, extraction, force,
                                    found, conditioned)
        except BaseException:
            if created and not any(self.root.iterdir()):
                self.root.rmdir()  # a failed first build leaves no empty store behind
            raise
        return {k: found[k] for k in chunks}

    def _cached(self, lm: LoadedModel, path: Path, layers: list[int], force: bool) -> tuple[StoredEngram | None, set[int]]:
        """The file at `path` when it holds every layer asked for (and force is off) -> (engram, None), else (None, the
        layers it holds, which a rebuild keeps: a build never shrinks a file)."""
        if not path.exists():
            return None, set()
        if force:
            try:
                return None, {int(layer) for layer in self.read_metadata(path)["layers"].split(",")}
            except EngramEvalError:
                return None, set()  # unreadable: rebuild just the requested layers over it
        stored = self.load(path)
        if stored.metadata["model_fingerprint"] != lm.fingerprint:
            raise EngramEvalError(
                f"store file {path} was built with model {stored.metadata['model']} "
                f"({stored.metadata['model_fingerprint'][:12]}), not {lm.name} ({lm.short_fingerprint})"
            )
        if set(layers) <= set(stored.engram.layers):
            return stored, set()
        return None, set(stored.engram.layers)

    def _build_pending(self, lm: LoadedModel, source_name: str, ids: list[int], truncated: bool, source_sha: str,
                       layers: list[int], pending: list[int], keys: dict[int, str], extraction: Extraction, force: bool,
                       found: dict[int, tuple[StoredEngram, str]], conditioned: dict[str, str]) -> None:
        """Under the keys' locks: what another builder finished meanwhile counts, the rest is built in one pass."""
        missing: list[tuple[int, str, Path]] = []
        wanted = set(layers)
        for k in pending:
            path = self.path_for(source_name, keys[k])
            cached, held = self._cached(lm, path, layers, force)
            if cached is not None:
                found[k] = (cached, "cached")
                continue
            wanted |= held
            missing.append((k, keys[k], path))
        if missing:
            built = extract_engrams(lm, ids, truncated, sorted(wanted), [k for k, _, _ in missing], extraction, source_name)
            for k, key, path in missing:
                status = "rebuilt" if path.exists() else "built"
                engram = built[k]
                if (why := unusable_layer({layer: v.numpy() for layer, v in engram.layers.items()})) is not None:
                    raise EngramEvalError(f"source '{source_name}': its engram cannot be used ({why}); nothing written to {path}")
                metadata = {
                    "format_version": FORMAT_VERSION,
                    "key": key,
                    "model": lm.name,
                    "model_fingerprint": lm.fingerprint,
                    "hidden_size": str(lm.hidden_size),
                    "source_name": source_name,
                    "source_sha256": source_sha,
                    **conditioned,
                    "n_tokens": str(engram.n_tokens),
                    "max_tokens": str(extraction.max_tokens),
                    "truncated": "true" if engram.truncated else "false",
                    "chunks": str(k),
                    "padded_chunks": str(max(0, k - engram.n_tokens)),
                    "pooling": extraction.pooling,
                    "skip_tokens": str(extraction.skip_tokens),
                    "window": "none" if extraction.window is None else str(extraction.window),
                    "windows": str(engram.windows),
                    **({"last_layer": LAST_BLOCK_OUTPUT} if extraction.block_output else {}),
                    **learning_metadata(engram, extraction),
                    "layers": ",".join(str(layer) for layer in sorted(wanted)),
                    "engram_eval_version": __version__,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
                found[k] = (StoredEngram(path=path, engram=engram, metadata=self.save(engram, metadata, path)), status)


def ids_sha256(ids: tuple[int, ...] | list[int]) -> str:
    return text_sha256(",".join(map(str, ids)))


def learning_metadata(engram: Engram, extraction: Extraction) -> dict[str, str]:
    """--pooling learned: the objective and its settings, and per layer the steps run and the objective's value at the
    initial and the stored vectors (JSON objects by layer)."""
    if engram.learning is None:
        return {}
    per_layer = lambda field: json.dumps({str(layer): getattr(record, field) for layer, record in sorted(engram.learning.items())})  # noqa: E731
    return {"learn_objective": extraction.learn_objective, "learn_steps": str(extraction.learn_steps),
            "learn_lr": repr(extraction.learn_lr), "learn_seed": str(extraction.learn_seed),
            "learn_probes_sha256": probes_sha256(extraction), "learn_steps_run": per_layer("steps"),
            "learn_loss_init": per_layer("loss_init"), "learn_loss_final": per_layer("loss_final")}


def engram_warnings(name: str, stored: StoredEngram) -> list[str]:
    """What a researcher must know about an engram before trusting it: truncation and padding (a dominant chunk is
    collected with `dominance` and said once for all sources, with `dominance_warning`)."""
    engram, metadata = stored.engram, stored.metadata
    warnings = []
    if engram.truncated:
        warnings.append(f"source '{name}' truncated to {engram.n_tokens} tokens (--max-tokens)")
    if int(metadata.get("padded_chunks", 0)):
        warnings.append(f"source '{name}' has {engram.n_tokens} tokens, fewer than k = {engram.chunks}: "
                        f"{metadata['padded_chunks']} of its chunks repeat the last token's state")
    return warnings


def engram_label(name: str, k: int, chunks: list[int]) -> str:
    """How run.json names an engram: its source, and its k when the run has several."""
    return name if len(chunks) == 1 else f"{name}@k{k}"


def bank_engrams(lm: LoadedModel, bank: Bank, store: EngramStore, layers: list[int], chunks: list[int], extraction: Extraction,
                 warn: Callable[[str], None] = lambda message: None,
                 log: Callable[[str], None] = lambda message: None,
                 on_ready: Callable[[str, int, StoredEngram], None] = lambda name, k, stored: None,
                 state: tuple[int, ...] | None = None,
                 ) -> dict[tuple[str, int], StoredEngram]:
    """Every source engram the bank's questions use, by (source, k), from the store (built where it lacks them; one
    forward pass per source serves every k). A source with paraphrases also gives each of theirs, by
    (paraphrase_name(source, i), k). on_ready hears of each as soon as it is in the store. state (--reextract): each
    source read after these token ids (pass a bank of the one question they are the prompt of)."""
    needed = bank.source_names([name for q in bank.questions for name in (q.engram, *q.controls)])  # expressions: their sources
    texts = {paraphrase_name(name, i): text for name in needed for i, text in enumerate(bank.sources[name].texts)}
    engrams: dict[tuple[str, int], StoredEngram] = {}
    dominated: list[str] = []
    for name, text in texts.items():
        for k, (stored, status) in store.ensure_all(lm, name, text, layers, chunks, extraction, state=state).items():
            if stored.engram.layers[layers[0]].shape[-1] != lm.hidden_size:
                raise EngramEvalError(f"store file {stored.path}: hidden size differs from {lm.name}'s {lm.hidden_size}")
            if status != "cached":
                for warning in engram_warnings(name, stored.restricted(layers)):
                    warn(warning)
                if (where := dominance(engram_label(name, k, chunks), stored.restricted(layers).engram.layers)) is not None:
                    dominated.append(where)
            log(f"engram {engram_label(name, k, chunks)}: {status} ({stored.path})")
            engrams[(name, k)] = stored
            on_ready(name, k, stored)
    if (merged := dominance_warning(dominated)) is not None:
        warn(merged)
    return engrams
