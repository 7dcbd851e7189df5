"""Model resolution: an embedded alias, a local directory, a .gguf file or a hub id -> a loaded causal LM, used through
its backend (engram_eval.backend.interface)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from ..core.errors import EngramEvalError, first_line
from ..core.files import read_text
from ..core.progress import progress_bar
from .embedded import DEFAULT_MODEL, EMBEDDED_MODELS, assembled_gguf, cache_dir, file_sha256
from .hf import HFCausalLM
from .interface import Backend
from .scale import EmbeddingScale, measure_embedding_scale

# Keys of config.json that do not change the numbers a model computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "quantization_config", "torch_dtype", "dtype"}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    source: str = field(default="")
    description: str = field(default="")  # the model as it is, for reports: "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32"
    spec: str = field(default="")  # what --model said: how another process (a Ray worker) loads the same model
    trust_remote_code: bool = False  # as loaded: another process loads it the same way
    backend: Backend = field(default=None, repr=False)  # type: ignore[assignment]  # None: the Hugging Face backend of `model`

    def __post_init__(self) -> None:
        if self.backend is None:
            self.backend = HFCausalLM(self.model, self.tokenizer, self.device, self.dtype)

    @property
    def num_layers(self) -> int:
        return self.backend.num_layers

    @property
    def family(self) -> str | None:
        """The config's model type (llama, gemma3_text, ...): what a llama.cpp control vector's model_hint names."""
        return getattr(self.model.config, "model_type", None)

    @property
    def hidden_size(self) -> int:
        return self.backend.hidden_size

    @cached_property
    def embedding_scale(self) -> EmbeddingScale:
        """The engram scale measured through the model at the first block's input (engram_eval.backend.scale), once per
        loaded model (0.2 s for SmolLM2, 1.2 s for Gemma 3 270M on 2 CPU cores): never read from a cache, so a run always
        records what this version measures."""
        return measure_embedding_scale(self.backend)

    @property
    def embedding_norm(self) -> float:
        """The engram scale's numerator: the norm a prefix vector needs at strength 1 to arrive at the first block like a
        real token (on Llama-like models the seeds' mean row norm of the input embedding matrix, to the bit)."""
        return self.embedding_scale.token_norm

    @cached_property
    def adds_bos(self) -> bool:
        """The tokenizer puts a BOS token first by itself (Gemma, Llama 3), as every training sequence began: the engram
        then goes after it (`--prefix-at after-bos`). SmolLM2's and Qwen's add none (SmolLM2's bos_token opens chat
        turns, typed by its template, not added)."""
        return leading_bos(self.tokenizer)

    def starts_with_bos(self, ids: tuple[int, ...] | list[int]) -> bool:
        """These ids begin with the BOS token the tokenizer adds."""
        return self.adds_bos and len(ids) > 0 and ids[0] == self.tokenizer.bos_token_id

    @property
    def short_fingerprint(self) -> str:
        return self.fingerprint[:12]

    @property
    def max_positions(self) -> int | None:
        """The longest input the model was built for (its config's max_position_embeddings), None when it says none."""
        return self.backend.max_positions


def leading_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether tokenizing a text with the default special tokens puts the BOS token first (and without them does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    return bool(with_special) and with_special[0] == bos and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def embedded_gguf_path(alias: str) -> Path:
    """An embedded model's GGUF file (assembled into the cache once where it ships in chunks)."""
    return assembled_gguf(alias, cache_dir())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise EngramEvalError(f"--device: unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EngramEvalError(f"--device: '{device}' asked for, but no CUDA device is available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise EngramEvalError(f"--dtype: unknown dtype '{dtype}' (use auto, {', '.join(choices)})")
    return choices[dtype]


def dequantized_gguf_dir(gguf: Path) -> Path:
    """A safetensors copy of a GGUF model, made once (dequantizing takes ~30 s) and cached by content hash."""
    target = gguf_cache_name(gguf)
    if (target / "config.json").is_file():
        return target
    with hf_progress_bars_off(), progress_bar(3, f"preparing {gguf.name} (once)", "step") as bar:
        try:
            tokenizer = gguf_tokenizer(gguf, target)
            bar.update()
            quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:  # a damaged file fails anywhere in the GGUF parser (struct, UnicodeDecodeError, KeyError)
            raise EngramEvalError(f"--model: {gguf} is not a readable GGUF model ({type(exc).__name__}: {first_line(exc)})") from None
        bar.update()
        # save_pretrained refuses a model that carries a GGUF quantization_config: copy it into a plain one.
        config = quantized.config.to_dict()
        config.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config))
        plain.load_state_dict(quantized.state_dict())
        saved = saved_into(target, plain, tokenizer)
        bar.update()
    return saved


@contextlib.contextmanager
def hf_progress_bars_off() -> Iterator[None]:
    """transformers' own bars off while the block runs (they would print a carriage-return line per tensor into a log,
    and --quiet could not silence them); ours say what runs. Its GGUF reader draws a plain tqdm that its logging
    switch does not reach: that one is swapped for a silent one, and put back."""
    import transformers.modeling_gguf_pytorch_utils as gguf_reader

    enabled, drawn = hf_logging.is_progress_bar_enabled(), gguf_reader.tqdm
    hf_logging.disable_progress_bar()
    gguf_reader.tqdm = functools.partial(drawn, disable=True)
    try:
        yield
    finally:
        gguf_reader.tqdm = drawn
        if enabled:
            hf_logging.enable_progress_bar()


def saved_into(target: Path, *parts) -> Path:
    """Each part's save_pretrained into a staging folder beside target, renamed to target when whole (another process
    that got there first wins; nothing half-written is left)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        for part in parts:
            part.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def tokenizer_only_dir(full: Path) -> Path:
    """Where `bank validate` keeps a GGUF's tokenizer and config without its weights: beside its dequantized copy's
    folder `full` (gguf_cache_name)."""
    return full.parent / f"{full.name}.tokenizer"


def gguf_cache_name(gguf: Path) -> Path:
    """Where a GGUF's dequantized copy is cached: its name and content hash (a file that is not a GGUF: one line)."""
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise EngramEvalError(f"--model: {gguf} is not a GGUF file (it does not start with the GGUF magic bytes)")
    return cache_dir() / f"{gguf.stem}-{file_sha256(gguf)[:16]}"


def gguf_tokenizer(gguf: Path, full: Path) -> PreTrainedTokenizerBase:
    """A GGUF's tokenizer (full: its gguf_cache_name, hashed once by the caller): from the tokenizer-only cache when
    `bank validate` made one, else converted from its metadata (about 20 s for Gemma 3's 262k tokens)."""
    tokenizer_only = tokenizer_only_dir(full)
    if (tokenizer_only / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(tokenizer_only)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def gguf_tokenizer_dir(gguf: Path) -> Path:
    """A folder with a GGUF's tokenizer and config.json and no weights (the dequantized copy where there is one): made
    once, without dequantizing anything."""
    full = gguf_cache_name(gguf)
    if (full / "config.json").is_file():
        return full
    target = tokenizer_only_dir(full)
    if (target / "config.json").is_file():
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # a damaged file fails anywhere in the GGUF parser
        raise EngramEvalError(f"--model: {gguf} is not a readable GGUF model ({type(exc).__name__}: {first_line(exc)})") from None
    config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    return saved_into(target, tokenizer, config)


def _config_settings(config: PretrainedConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}


def model_fingerprint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable hash of what determines the numbers: config, tokenizer and the weights as loaded (dtype included)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(_config_settings(model.config), sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest.update(vocab.encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(memoryview(tensor.detach().cpu().contiguous().view(torch.uint8).numpy()))
    return digest.hexdigest()


def gguf_description(gguf: Path) -> str:
    """'SmolLM2-135M-Instruct.Q4_1.gguf' -> 'SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32'."""
    model, _, quantization = gguf.stem.rpartition(".")
    return f"{model or gguf.stem}, {quantization + ' ' if model else ''}GGUF dequantized to float32"


PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def load_failure(spec: str, exc: BaseException, what: str = "") -> EngramEvalError:
    """One line for a model that cannot be loaded; a refusal to run a repository's own code says how to allow it."""
    text = " ".join(str(exc).split())
    if "trust_remote_code" in text or "custom code" in text:
        return EngramEvalError(f"--model: '{spec}' ships its own code, which runs when it loads; engram-eval runs none unless "
                               "you pass --trust-remote-code (read that code first)")
    return EngramEvalError(f"--model: could not load {what}'{spec}': {first_line(exc)}")


def _resolve_source(spec: str, weights: bool = True) -> tuple[str, str, str]:
    """-> (name, path or hub id to pass to from_pretrained, description without the dtype). weights=False: a GGUF's
    tokenizer and config only, nothing dequantized."""
    prepare = dequantized_gguf_dir if weights else gguf_tokenizer_dir
    if spec in EMBEDDED_MODELS:
        gguf = embedded_gguf_path(spec)
        return spec, str(prepare(gguf)), f"{EMBEDDED_MODELS[spec].description} GGUF dequantized to float32"
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EngramEvalError(f"--model: GGUF file {path} not found")
        return path.stem, str(prepare(path)), gguf_description(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EngramEvalError(f"--model: {path} is a directory without config.json (not a Hugging Face model directory)")
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLED_WEIGHTS)
        if pickled and not any(path.glob("*.safetensors")):
            raise EngramEvalError(f"--model: {path} holds its weights only as pickle files ({', '.join(pickled)}); engram-eval "
                                  "never unpickles (a pickle can run code): convert them to safetensors")
        return path.name, str(path), path.name
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        known = ", ".join(EMBEDDED_MODELS)
        raise EngramEvalError(
            f"--model: '{spec}' is not an embedded model ({known}), a local model directory, a .gguf file or a hub id"
        )
    return spec, spec, spec


@dataclass
class TokenizerOnly:
    """A model's tokenizer without its weights, for the checks that need no forward pass (bank validate, stats)."""

    tokenizer: PreTrainedTokenizerBase
    name: str
    max_positions: int | None = None  # from its config, as LoadedModel.max_positions


def load_tokenizer(spec: str = DEFAULT_MODEL, trust_remote_code: bool = False) -> TokenizerOnly:
    name, source, _ = _resolve_source(spec, weights=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise load_failure(spec, exc, "the tokenizer of ") from None
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        config = None  # the tokenizer's checks still run; the length check needs a config
    return TokenizerOnly(tokenizer, name, getattr(config, "max_position_embeddings", None))


def load_model(
    spec: str = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
) -> LoadedModel:
    """Load a causal LM for extraction and sweeps, in eval mode, with its fingerprint."""
    name, source, description = _resolve_source(spec)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    if not (description.endswith("to float32") and torch_dtype == torch.float32):
        description += f", run in {dtype_name}" if "GGUF" in description else f", {dtype_name}"
    try:
        with hf_progress_bars_off():  # keep stderr for what the user must read
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                         use_safetensors=True)  # never a pickled checkpoint
    except (OSError, ValueError, KeyError) as exc:
        raise load_failure(spec, exc) from None
    model.to(torch_device).eval()
    model.requires_grad_(False)
    HFCausalLM(model, tokenizer, torch_device, torch_dtype).check_head()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        fingerprint=model_fingerprint(model, tokenizer),
        device=torch_device,
        dtype=torch_dtype,
        source=source,
        description=description,
        spec=spec,
        trust_remote_code=trust_remote_code,
    )


def random_init_model(
    config_path: Path, tokenizer: PreTrainedTokenizerBase, *, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> LoadedModel:
    """A randomly initialised model built from a config.json, with another model's tokenizer: speed needs no weights
    (the benchmark's GPU runs use Qwen2.5-7B's configuration this way)."""
    try:
        config_dict = json.loads(read_text(config_path, "model config"))
        if not isinstance(config_dict, dict) or "model_type" not in config_dict:
            raise ValueError("no model_type: not a Hugging Face config.json")
        config = AutoConfig.for_model(**config_dict)
    except (ValueError, TypeError) as exc:
        raise EngramEvalError(f"{config_path}: not a usable model config ({first_line(exc)})") from None
    if len(tokenizer) > config.vocab_size:
        raise EngramEvalError(f"{config_path}: vocab_size {config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    identity = {"config": _config_settings(config), "random_init_seed": seed, "torch": torch.__version__}
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=f"random-init {config_path.name}",
        fingerprint=hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest(),
        device=device,
        dtype=dtype,
        source=str(config_path),
        description=f"random-init {config_path.name}, {str(dtype).removeprefix('torch.')}",
    )
