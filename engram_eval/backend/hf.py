"""The Hugging Face backend: `HFCausalLM` implements engram_eval.backend.interface.Backend for transformers' causal
LMs. Where an architecture keeps its decoder blocks is a table, `DECODER_BLOCKS`."""

from __future__ import annotations

import functools
import inspect
import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from ..core.errors import EngramEvalError
from .interface import Backend

# Attribute paths from the top-level causal LM to its decoder blocks, tried in order (Llama, Qwen, Mistral, Gemma,
# Phi-3 ...: model.layers; GPT-2, GPT-J, Falcon, Bloom: transformer.h; Pythia: gpt_neox.layers; OPT: model.decoder.layers).
DECODER_BLOCKS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
# Attribute names of a block's attention module, tried in order.
ATTENTION_MODULES = ("self_attn", "attn", "attention", "self_attention")


def find_decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    for path in DECODER_BLOCKS:
        found: Any = model
        for name in path.split("."):
            found = getattr(found, name, None)
        if isinstance(found, torch.nn.ModuleList):
            return found
    raise EngramEvalError(f"{type(model).__name__}: no decoder blocks at any of {', '.join(DECODER_BLOCKS)} "
                          "(add its path to engram_eval.backend.hf.DECODER_BLOCKS)")


def find_attention(block: torch.nn.Module) -> torch.nn.Module:
    for name in ATTENTION_MODULES:
        if isinstance(module := getattr(block, name, None), torch.nn.Module):
            return module
    raise EngramEvalError(f"{type(block).__name__}: no attention module at any of {', '.join(ATTENTION_MODULES)}")


class HFCausalLM(Backend):
    """A Hugging Face causal LM (AutoModelForCausalLM), in eval mode."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype):
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def embedding_matrix(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight.detach()

    def hidden_states(self, ids: torch.Tensor) -> Sequence[torch.Tensor]:
        return self.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states

    def last_hidden(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.model.base_model(inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head as the architecture applies it after its weight: Granite divides by logits_scaling, Cohere
        multiplies by logit_scale, Gemma soft-caps (check_head verifies the whole against the model's own logits)."""
        config = self.model.config
        logits = self.model.get_output_embeddings()(hidden).float()
        if divisor := getattr(config, "logits_scaling", None):
            logits = logits / divisor
        if factor := getattr(config, "logit_scale", None):
            logits = logits * factor
        if cap := getattr(config, "final_logit_softcapping", None):
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.inference_mode()
    def check_head(self) -> None:
        """The split this backend scores with (last_hidden, then logits on the positions kept) gives the model's own
        logits on a probe; an architecture whose head does something else after its weight is refused, not scored
        silently wrong."""
        ids = torch.arange(min(8, self.model.config.vocab_size), device=self.device).unsqueeze(0)
        embeds = self.embed(ids)
        ours = self.logits(self.last_hidden(embeds)[0])
        theirs = self.model(inputs_embeds=embeds, use_cache=False).logits[0].float()
        tolerance = (1e-4 if self.dtype == torch.float32 else 3e-2) * max(1.0, theirs.abs().max().item())
        if (difference := (ours - theirs).abs().max().item()) > tolerance:
            raise EngramEvalError(f"{type(self.model).__name__}: its LM head does more than its weight (logits differ from the "
                                  f"model's own by {difference:.3g}); engram-eval does not know this architecture's head "
                                  "(add it to engram_eval.backend.hf.HFCausalLM.logits)")

    def full_logits(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=inputs_embeds).logits

    def blocks(self) -> Sequence[torch.nn.Module]:
        return find_decoder_blocks(self.model)

    def attention_modules(self) -> Sequence[torch.nn.Module]:
        return [find_attention(block) for block in self.blocks()]

    def hookpoint(self, name: str) -> torch.nn.Module | None:
        return dict(self.model.base_model.named_modules()).get(name)

    @contextmanager
    def eager_attention(self) -> Iterator[None]:
        before = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.model.set_attn_implementation(before)

    def prefill(self, inputs_embeds: torch.Tensor, mask: torch.Tensor | None,
                positions: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        output = self.model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1)
        return output.logits[:, -1].float(), self._cache_of(output)

    def decode(self, inputs_embeds: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
               cache: Any) -> tuple[torch.Tensor, Any]:
        output = self.model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions,
                            use_cache=True, logits_to_keep=1, **{self._cache_argument: cache})
        return output.logits[:, -1].float(), self._cache_of(output)

    @functools.cached_property
    def _cache_argument(self) -> str:
        """transformers >= 5.24 names the KV cache `cache` (`past_key_values` warns, then goes); earlier ones do not."""
        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _cache_of(self, output: Any) -> Any:
        return getattr(output, self._cache_argument)

    def eos_token_ids(self) -> set[int]:
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if configured is None:
            configured = self.tokenizer.eos_token_id
        return set(configured if isinstance(configured, list) else [] if configured is None else [configured])

    def bytes_per_sequence(self, seq_len: int) -> int:
        config = self.model.config
        bytes_per = torch.finfo(self.dtype).bits // 8
        heads = getattr(config, "num_attention_heads", 1)
        intermediate = getattr(config, "intermediate_size", 4 * self.hidden_size)
        return bytes_per * seq_len * (8 * self.hidden_size + 3 * intermediate + 2 * heads * seq_len) + 8 * config.vocab_size

    def free_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def flops_per_token(self) -> tuple[float, float]:
        config = self.model.config
        embedding = config.vocab_size * config.hidden_size
        non_embedding = sum(p.numel() for p in self.model.parameters()) - embedding * (1 if config.tie_word_embeddings else 2)
        return 2 * non_embedding, 2 * config.hidden_size * config.vocab_size

    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        return self.model.generate(inputs_embeds=inputs_embeds, do_sample=False, max_new_tokens=max_new_tokens,
                                   attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long,
                                                             device=inputs_embeds.device))[0]
