"""A straightforward, unbatched implementation of METHOD.md, written independently of the package.

Tests compare engram-eval's numbers with these: one forward pass per layer and per cell, logits for every
position, a full softmax, Python loops.
"""

from __future__ import annotations

import torch


def reference_chunks(states: list[list[float]] | torch.Tensor, k: int) -> torch.Tensor:
    n = len(states)
    size = max(1, n // k)
    out = []
    for i in range(k):
        start = i * size
        if start >= n:
            out.append(states[n - 1])
            continue
        stop = n if i == k - 1 else start + size
        total = states[start].clone()
        for j in range(start + 1, stop):
            total = total + states[j]
        out.append(total / (stop - start))
    return torch.stack(out)


@torch.no_grad()
def reference_layer_states(model, tokenizer, text: str, layer: int) -> torch.Tensor:
    """hidden_states[layer] for one layer, from its own forward pass with a hook (not output_hidden_states)."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    captured = {}
    if layer == 0:
        module = model.get_input_embeddings()
    else:
        module = model.model.layers[layer - 1]
    handle = module.register_forward_hook(lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    model(input_ids=ids)
    handle.remove()
    states = captured["h"][0].float()
    if layer == model.config.num_hidden_layers:  # transformers applies the final norm to the last entry
        states = model.model.norm(captured["h"])[0].float()
    return states


@torch.no_grad()
def reference_engram(model, tokenizer, text: str, layer: int, k: int = 16) -> torch.Tensor:
    return reference_chunks(reference_layer_states(model, tokenizer, text, layer), k)


@torch.no_grad()
def reference_distribution(model, tokenizer, engram: torch.Tensor | None, strength: float, prompt: str) -> torch.Tensor:
    """The full next-token distribution after [scaled engram; prompt], seed method: prefix injection, float32 softmax."""
    table = model.get_input_embeddings().weight.float()
    prompt_embeds = table[tokenizer(prompt)["input_ids"]]
    if engram is None:
        inputs = prompt_embeds
    else:
        scale = table.norm(dim=1).mean() / engram.norm(dim=1).mean()
        inputs = torch.cat([engram * scale * strength, prompt_embeds])
    logits = model(inputs_embeds=inputs.unsqueeze(0)).logits[0, -1].float()
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def reference_cell(model, tokenizer, engram: torch.Tensor | None, strength: float, prompt: str,
                   correct: list[str], incorrect: list[str]) -> tuple[float, float]:
    """(p_correct, p_incorrect) for one cell, seed method: first token, max over variants."""
    probs = reference_distribution(model, tokenizer, engram, strength, prompt)
    first = lambda v: tokenizer.encode(v, add_special_tokens=False)[0]  # noqa: E731
    return max(probs[first(v)].item() for v in correct), max(probs[first(v)].item() for v in incorrect)
