"""The model backend interface: every use of a causal LM's internals (embeddings, hidden states, decoder blocks and
their hooks, the LM head, KV-cache decoding, eager attention, the memory budget) goes through `Backend`. Extraction,
injection, scoring, generation and the benchmark use only this interface; engram_eval.backend.hf implements it for
Hugging Face causal LMs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch


class Backend(ABC):
    """What engram-eval needs of a causal LM. Layer L means the hidden states after L blocks: 0 is the embedding
    output, num_layers the last (after the final norm, as transformers returns it). Tensors are on `device`."""

    device: torch.device
    dtype: torch.dtype

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @property
    @abstractmethod
    def max_positions(self) -> int | None:
        """The longest input (positions) the model was built for; None when it states none."""

    @abstractmethod
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> input embeddings [..., hidden]."""

    @abstractmethod
    def embedding_matrix(self) -> torch.Tensor:
        """The input embedding matrix [vocab, hidden] (read-only)."""

    @abstractmethod
    def hidden_states(self, ids: torch.Tensor) -> Sequence[torch.Tensor]:
        """One forward pass over ids [1, n] -> the hidden states of every layer 0..num_layers, each [1, n, hidden]."""

    @abstractmethod
    def last_hidden(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Input embeddings [batch, n, hidden] -> the last layer's hidden states (no LM head), without a cache."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states [m, hidden] -> the LM head's float32 logits [m, vocab] (soft-capped if the model is)."""

    @abstractmethod
    def full_logits(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """The whole model's logits [batch, n, vocab] in its dtype: the seed's plain call (benchmark reference)."""

    @abstractmethod
    def blocks(self) -> Sequence[torch.nn.Module]:
        """The decoder blocks, in order; block L-1's output is layer L. A forward hook on a block sees the hidden
        states as its output (or as the output's first element) and may return them changed."""

    def hookpoint(self, name: str) -> torch.nn.Module | None:
        """The module a hook-point name names, as lm-eval's steered model resolves it (a module name below the model's
        base model, like `layers.7`), or None."""
        return None

    @abstractmethod
    def attention_modules(self) -> Sequence[torch.nn.Module]:
        """Each block's attention module; under `eager_attention` its output's second element is the attention
        weights [batch, heads, query, key]."""

    @abstractmethod
    def eager_attention(self) -> Any:
        """A context manager: the attention kernel that returns its weights, while it is open."""

    @abstractmethod
    def prefill(self, inputs_embeds: torch.Tensor, mask: torch.Tensor | None,
                positions: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """A batch's prompts with a fresh KV cache -> (float32 logits of the last position [batch, vocab], cache)."""

    @abstractmethod
    def decode(self, inputs_embeds: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
               cache: Any) -> tuple[torch.Tensor, Any]:
        """One more position per row [batch, 1, hidden] on the cache -> (float32 logits [batch, vocab], cache)."""

    @abstractmethod
    def eos_token_ids(self) -> set[int]: ...

    @abstractmethod
    def bytes_per_sequence(self, seq_len: int) -> int:
        """A rough upper bound on one sequence's activation memory in a forward pass."""

    @abstractmethod
    def free_memory(self) -> int:
        """Bytes free on the device now."""

    @abstractmethod
    def flops_per_token(self) -> tuple[float, float]:
        """(FLOPs per token of everything but the embeddings and the head, FLOPs of the head per scored position)."""

    @abstractmethod
    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """The library's own greedy generation of one row (the benchmark's reference) -> the new token ids."""
