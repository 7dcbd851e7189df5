"""The engram store's files: names, keys, metadata and verified arrays -- read with NumPy, so `store ls` and `store
show` start without torch. Building and loading engrams for a sweep is `store.EngramStore`."""

from __future__ import annotations

import hashlib
import json
import re
from importlib.resources import files
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

from ..core.errors import EngramEvalError
from ..core.spec import SEED_EXTRACTION, Extraction

FORMAT_VERSION = "1"


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """The checksum a store file records of its tensors: name, shape and raw bytes of each, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{tuple(array.shape)}".encode())
        digest.update(memoryview(array.view(np.uint8)))
    return digest.hexdigest()


def engram_key(model_fingerprint: str, source_sha256: str, chunks: int, n_tokens: int,
               extraction: Extraction = SEED_EXTRACTION) -> str:
    """Same inputs -> same key -> same file. The seed's extraction keeps the key it always had."""
    identity = f"{model_fingerprint}|{source_sha256}|{chunks}|{n_tokens}"
    if not extraction.is_seed:
        identity += f"|{extraction.pooling}|{extraction.skip_tokens}|{extraction.window}"
    if extraction.block_output:
        identity += "|block-output"
    if extraction.learns:
        identity += (f"|{extraction.learn_objective}|{extraction.learn_steps}|{extraction.learn_lr!r}|{extraction.learn_seed}"
                     f"|{probes_sha256(extraction)}")
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def learn_probes(extraction: Extraction) -> tuple[str, ...]:
    """distill's probe prompts: the user's (--learn-probes), or the bundled ones (engram/learn_probes.txt)."""
    if extraction.learn_probes is not None:
        return extraction.learn_probes
    return probe_lines(files("engram_eval.engram").joinpath("learn_probes.txt").read_text(encoding="utf-8"))


def probe_lines(text: str) -> tuple[str, ...]:
    """A probe file's prompts: its non-empty lines, stripped."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def probes_sha256(extraction: Extraction) -> str:
    """What the key and the metadata record of the probes: their sha256 under distill, '-' otherwise."""
    return text_sha256("\n".join(learn_probes(extraction))) if extraction.learn_objective == "distill" else "-"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "source"


REQUIRED_METADATA = ("key", "model", "model_fingerprint", "source_name", "n_tokens", "chunks", "truncated", "layers")


def metadata_problem(metadata: dict[str, str]) -> str | None:
    """What is wrong with a store file's metadata (a field missing or not of its kind), or None."""
    for field in REQUIRED_METADATA:
        if field not in metadata:
            return f"its metadata lacks '{field}'"
    for field in ("n_tokens", "chunks", "max_tokens", "skip_tokens", "windows", "padded_chunks", "hidden_size"):
        if field in metadata and not (metadata[field].isdigit() and (int(metadata[field]) > 0 or field in ("skip_tokens", "padded_chunks"))):
            return f"its metadata's '{field}' is {metadata[field]!r}, not a count"
    if metadata["truncated"] not in ("true", "false"):
        return f"its metadata's 'truncated' is {metadata['truncated']!r}, not true or false"
    if not all(layer.isdigit() for layer in metadata["layers"].split(",")):
        return f"its metadata's 'layers' is {metadata['layers']!r}, not a list of layers"
    return None


def unusable_layer(layers: dict[int, np.ndarray], chunks: int | None = None) -> str | None:
    """Why these vectors cannot be an engram (a non-finite value, an all-zero chunk, another chunk count), or None."""
    for layer, vectors in layers.items():
        if vectors.ndim != 2 or (chunks is not None and vectors.shape[0] != chunks):
            return f"layer {layer} has {vectors.shape[0] if vectors.ndim else 0} rows, not its {chunks} chunks"
        if not np.isfinite(vectors).all():
            return f"layer {layer} holds a non-finite value (NaN or inf)"
        if not np.linalg.norm(vectors.astype(np.float64), axis=1).all():
            return f"layer {layer} has an all-zero chunk (norm 0)"
    return None


class StoreFiles:
    """The store's folder: one `{source}.{key}.safetensors` file per engram, plus writers' temporaries."""

    def __init__(self, root: str | Path = "store"):
        self.root = Path(root)

    @classmethod
    def existing(cls, root: str | Path) -> StoreFiles:
        """A store to inspect or tidy: its folder must exist (building creates it; reading a typo should not)."""
        if not Path(root).is_dir():
            raise EngramEvalError(f"store {root}: no such folder (build engrams with `engram-eval build`, or pass --store)")
        return cls(root)

    @staticmethod
    def key_of(path: Path) -> str:
        """The content key in a store file's name ({source}.{key}.safetensors), readable even when the file is not."""
        return path.name.removesuffix(".safetensors").rsplit(".", 1)[-1]

    def corrupt(self, path: Path, why: str) -> EngramEvalError:
        return EngramEvalError(
            f"store file {path} is {why}; remove it with `engram-eval store rm {self.key_of(path)} --store {self.root}` "
            "(the next build or sweep rebuilds it)"
        )

    def path_for(self, source_name: str, key: str) -> Path:
        return self.root / f"{safe_name(source_name)}.{key}.safetensors"

    def paths(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("*.safetensors") if not p.name.startswith("."))

    def stale_temporaries(self) -> list[Path]:
        """Temporary files left by writers that were killed (their pid is in the name and no longer runs), and lock
        files no live builder holds."""
        from ..core.locks import is_held

        stale = []
        for tmp in sorted(self.root.glob(".tmp-*")):
            pid = tmp.name.split("-")[1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                stale.append(tmp)
        return stale + [lock for lock in sorted(self.root.glob(".lock-*")) if not is_held(lock)]

    def remove_stale_temporaries(self) -> None:
        for tmp in self.stale_temporaries():
            tmp.unlink(missing_ok=True)

    def read_metadata(self, path: Path) -> dict[str, str]:
        try:
            with safe_open(path, framework="numpy") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise self.corrupt(path, f"corrupt or truncated ({exc})") from None
        if "tensors_sha256" not in metadata:
            raise self.corrupt(path, "not an engram-eval engram (no checksum)")
        if (problem := metadata_problem(metadata)) is not None:
            raise self.corrupt(path, f"unusable: {problem}")
        return metadata

    def read_layers(self, path: Path) -> tuple[dict[int, np.ndarray], dict[str, str]]:
        """One file's vectors per layer (checksum verified) and its metadata."""
        metadata = self.read_metadata(path)
        try:
            arrays = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise self.corrupt(path, f"corrupt or truncated ({exc})") from None
        if arrays_sha256(arrays) != metadata["tensors_sha256"]:
            raise self.corrupt(path, "corrupt (checksum mismatch)")
        layers = dict(sorted((int(name.split(".", 1)[1]), array) for name, array in arrays.items()))
        if sorted(layers) != sorted(int(layer) for layer in metadata["layers"].split(",")):
            raise self.corrupt(path, f"unusable: its metadata lists layers {metadata['layers']}, its tensors {sorted(layers)}")
        if (why := unusable_layer(layers, int(metadata["chunks"]))) is not None:
            raise self.corrupt(path, f"unusable: {why}")
        return layers, metadata

    def find(self, name: str) -> list[Path]:
        """Store files whose source name, file name or key (or a key prefix of 6+ characters) matches `name`."""
        matches = []
        for path in self.paths():
            source, key = path.name.removesuffix(".safetensors").rsplit(".", 1)
            if safe_name(name) == source or name in (key, path.name) or (len(name) >= 6 and key.startswith(name)):
                matches.append(path)
        return matches

    def unreferenced(self, referenced_keys: set[str]) -> list[Path]:
        """Engram files whose key no run references."""
        return [path for path in self.paths() if self.key_of(path) not in referenced_keys]


def runs_in_progress(run_roots: list[Path]) -> list[tuple[Path, dict]]:
    """Run directories below these folders that a live sweep or generate is writing now -> (folder, lock holder)."""
    from ..core.locks import is_held, read_holder

    running = []
    for root in run_roots:
        for lock in sorted(Path(root).rglob(".lock")):
            if (lock.parent / "run.json").exists() and is_held(lock):
                running.append((lock.parent, read_holder(lock)))
    return running


def run_engram_keys(run_roots: list[Path]) -> set[str]:
    """Every engram key recorded by a run.json below these folders (the engrams those runs used)."""
    keys: set[str] = set()
    for root in run_roots:
        for run_json in Path(root).rglob("run.json"):
            try:
                keys.update(json.loads(run_json.read_text()).get("engram_keys", {}).values())
            except (OSError, ValueError, AttributeError):
                raise EngramEvalError(f"{run_json}: unreadable run.json; cannot tell which engrams it uses") from None
    return keys
