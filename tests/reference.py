"""A straightforward, unbatched implementation of METHOD.md, written independently of the package.

Tests compare engram-eval's numbers with these: one forward pass per layer and per cell, logits for every
position, a full softmax, Python loops.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

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
def reference_layer_states(model, tokenizer, text: str, layer: int, final_norm: bool = True) -> torch.Tensor:
    """hidden_states[layer] for one layer, from its own forward pass with a hook (not output_hidden_states); without
    final_norm, the last layer is the last block's own output (actadd's site)."""
    return reference_states_of_ids(model, tokenizer(text)["input_ids"], layer, final_norm)


@torch.no_grad()
def reference_states_of_ids(model, token_ids: list[int], layer: int, final_norm: bool = True) -> torch.Tensor:
    """reference_layer_states for token ids rather than a text."""
    ids = torch.tensor([token_ids])
    captured = {}
    if layer == 0:
        module = model.get_input_embeddings()
    else:
        module = model.model.layers[layer - 1]
    handle = module.register_forward_hook(lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    model(input_ids=ids)
    handle.remove()
    states = captured["h"][0].float()
    if layer == model.config.num_hidden_layers and final_norm:  # transformers applies the final norm to the last entry
        states = model.model.norm(captured["h"])[0].float()
    return states


@torch.no_grad()
def reference_engram(model, tokenizer, text: str, layer: int, k: int = 16, final_norm: bool = True) -> torch.Tensor:
    return reference_chunks(reference_layer_states(model, tokenizer, text, layer, final_norm), k)


def reference_scaled(engram: torch.Tensor, table: torch.Tensor, strength: float, scaling: str = "global") -> torch.Tensor:
    """The seed scaling (one scalar), or each row to the embeddings' mean row norm (per-chunk)."""
    target = table.norm(dim=1).mean()
    if scaling == "per-chunk":
        return torch.stack([row / row.norm() * target * strength for row in engram])
    return engram * (target / engram.norm(dim=1).mean()) * strength


@torch.no_grad()
def reference_block_output(model, inputs: torch.Tensor, layer: int) -> torch.Tensor:
    """What block layer-1 outputs (layer 0: the input embeddings themselves) for [positions, hidden] inputs."""
    if layer == 0:
        return inputs
    captured = {}
    handle = model.model.layers[layer - 1].register_forward_hook(lambda m, i, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    model(inputs_embeds=inputs.unsqueeze(0))
    handle.remove()
    return captured["h"][0]


@contextmanager
def reference_steered(model, tokenizer, engram: torch.Tensor | None, strength: float, prompt: str, mode: str = "prefix",
                      layer: int | None = None, scaling: str = "global", positions: str = "all", answer_ids: tuple = ()):
    """The input embeddings of one cell (the prompt, then answer_ids if any), with a forward hook active for actadd.

    prefix: scaled engram rows before the prompt; add: added to the first k prompt embeddings; actadd: a forward hook
    adds strength * s * u to block layer-1's output (u: unit mean of the raw engram rows; s: mean row norm of that
    output without steering, over the prompt) at the positions `positions` names. The first forward pass is the prompt
    (and answer); every later one (generate's) is one generated token: all steers every position, prompt the prompt's
    only, answer the answer's and the generated ones, last the last prompt position and every one after.
    """
    table = model.get_input_embeddings().weight.float()
    prompt_length = len(tokenizer(prompt)["input_ids"])
    inputs = table[tokenizer(prompt)["input_ids"] + list(answer_ids)]
    handle = None
    calls = []

    def scope(n: int) -> torch.Tensor:
        """[n, 1]: which positions of this forward pass are steered."""
        first = not calls
        calls.append(n)
        steered = []
        for i in range(n):
            if not first:
                steered.append(positions != "prompt")
            elif positions == "all":
                steered.append(True)
            elif positions == "prompt":
                steered.append(i < prompt_length)
            elif positions == "answer":
                steered.append(i >= prompt_length)
            else:
                steered.append(i >= prompt_length - 1)
        return torch.tensor(steered, dtype=torch.float32).unsqueeze(-1)
    if engram is not None and mode == "prefix":
        inputs = torch.cat([reference_scaled(engram, table, strength, scaling), inputs])
    elif engram is not None and mode == "add":
        inputs = inputs.clone()
        inputs[: engram.shape[0]] += reference_scaled(engram, table, strength, scaling)
    elif engram is not None and mode == "actadd":
        s = reference_block_output(model, inputs[:prompt_length], layer).norm(dim=1).mean()
        mean = engram.mean(dim=0)
        vector = strength * s * mean / mean.norm()
        if layer == 0:  # the first pass takes these embeddings; generate embeds each later token itself
            inputs = inputs + vector * scope(len(inputs))
            handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o + vector * scope(o.shape[-2]))
        else:
            def add(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                steered = hidden + vector * scope(hidden.shape[-2])
                return (steered, *output[1:]) if isinstance(output, tuple) else steered
            handle = model.model.layers[layer - 1].register_forward_hook(add)
    try:
        yield inputs
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def reference_distribution(model, tokenizer, engram: torch.Tensor | None, strength: float, prompt: str, **method) -> torch.Tensor:
    """The full next-token distribution of one cell, float32 softmax."""
    with reference_steered(model, tokenizer, engram, strength, prompt, **method) as inputs:
        logits = model(inputs_embeds=inputs.unsqueeze(0)).logits[0, -1].float()
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def reference_generation(model, tokenizer, engram: torch.Tensor | None, strength: float, prompt: str, max_new_tokens: int,
                         **method) -> list[int]:
    """transformers' own greedy `generate` for one cell (new tokens only, EOS included when it ends the text)."""
    with reference_steered(model, tokenizer, engram, strength, prompt, **method) as inputs:
        output = model.generate(inputs_embeds=inputs.unsqueeze(0), do_sample=False, max_new_tokens=max_new_tokens)
    return output[0].tolist()


@torch.no_grad()
def reference_cell(model, tokenizer, engram: torch.Tensor | None, strength: float, prompt: str,
                   correct: list[str], incorrect: list[str], **method) -> tuple[float, float]:
    """(p_correct, p_incorrect) for one cell: first token, max over variants (method: mode, layer, scaling)."""
    probs = reference_distribution(model, tokenizer, engram, strength, prompt, **method)
    first = lambda v: tokenizer.encode(v, add_special_tokens=False)[0]  # noqa: E731
    return max(probs[first(v)].item() for v in correct), max(probs[first(v)].item() for v in incorrect)


@torch.no_grad()
def reference_window_states(model, ids: list[int], layer: int, window: int) -> torch.Tensor:
    """hidden_states[layer] of a long source run as consecutive independent windows, concatenated in order."""
    states = []
    for start in range(0, len(ids), window):
        out = model(input_ids=torch.tensor([ids[start:start + window]]), output_hidden_states=True)
        states.append(out.hidden_states[layer][0].float())
    return torch.cat(states)


def reference_pool(states: torch.Tensor, k: int, pooling: str) -> torch.Tensor:
    """mean: the seed's chunks; last: the last k states; pca: the k leading right-singular vectors of the centred
    states, each signed towards the mean state."""
    if pooling == "mean":
        return reference_chunks(states, k)
    if pooling == "last":
        return states[-k:]
    mean = states.mean(dim=0)
    _, _, vh = torch.linalg.svd(states - mean, full_matrices=False)
    return torch.stack([v if v @ mean >= 0 else -v for v in vh[:k]])


@torch.no_grad()
def reference_side_effects(model, tokenizer, engram: torch.Tensor | None, strength: float, passage: str,
                           **method) -> tuple[float, float]:
    """The neutral probe of one cell from two full forward passes over the passage (unsteered, steered): the mean
    over its n positions of KL(p_unsteered || p_steered) by torch's kl_div, and exp(mean NLL steered - mean NLL
    unsteered) over its n - 1 next tokens."""
    ids = torch.tensor(tokenizer(passage)["input_ids"])
    n = len(ids)

    def logprobs(vectors):
        with reference_steered(model, tokenizer, vectors, strength, passage, **method) as inputs:
            return torch.log_softmax(model(inputs_embeds=inputs.unsqueeze(0)).logits[0, -n:].float(), dim=-1)

    plain, steered = logprobs(None), logprobs(engram)
    kl = torch.nn.functional.kl_div(steered, plain, log_target=True, reduction="none").sum(dim=-1).mean().item()
    nll = [-lp[:-1].gather(-1, ids[1:, None]).mean().item() for lp in (plain, steered)]
    return kl, float(torch.tensor(nll[1] - nll[0]).exp())


@torch.no_grad()
def reference_conditioned_engram(model, tokenizer, state: list[int], text: str, layer: int, k: int,
                                 final_norm: bool = True) -> torch.Tensor:
    """--reextract: the source read after the state and a blank line; the chunk means of the source's positions only."""
    before = list(state) + tokenizer.encode("\n\n", add_special_tokens=False)
    states = reference_states_of_ids(model, before + tokenizer(text)["input_ids"], layer, final_norm)
    return reference_chunks(states[len(before):], k)


@torch.no_grad()
def reference_ensembled(model, tokenizer, text: str | None, fixed: torch.Tensor | None, strength: float, prompt: str,
                        max_new_tokens: int, size: int, decay: float, reextract: bool, layer: int, k: int,
                        mode: str = "prefix", eos: int | None = None) -> list[int]:
    """ACT's temporal ensembling, plainly: at each step (re-)extract the engram after prompt + generated, keep the newest
    `size`, average their full next-token distributions (each a fresh forward pass over prompt + generated, no cache)
    with weights exp(-decay * i), i = 0 the newest, normalised; greedy. Returns the new tokens, EOS included when it
    ends the text. text None: the fixed engram (no re-extraction)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    generated: list[int] = []
    window: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        if reextract and text is not None:
            engram = reference_conditioned_engram(model, tokenizer, prompt_ids + generated, text, layer, k, mode != "actadd")
        else:
            engram = fixed
        window = [engram, *window][:size]
        weights = [math.exp(-decay * i) for i in range(len(window))]
        mixed = sum(w / sum(weights) * reference_distribution(model, tokenizer, e, strength, prompt, mode=mode, layer=layer,
                                                              answer_ids=tuple(generated)).double()
                    for w, e in zip(weights, window))
        token = int(mixed.argmax())
        generated.append(token)
        if token == eos:
            break
    return generated


def repeng_export_gguf(directions: dict[int, "np.ndarray"], model_type: str, path) -> None:
    """repeng 0.4.0's ControlVector.export_gguf, line for line (repeng itself needs numpy < 2, which this project's
    transformers does not allow beside it): the llama.cpp control-vector layout."""
    import gguf

    arch = "controlvector"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer in directions.keys():
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@contextmanager
def block_output_added(model, block: int, vector: torch.Tensor):
    """A forward hook that adds `vector` to decoder block `block`'s output (0-based), at every position: what
    llama.cpp, repeng and steering-vectors do with a direction for that block."""
    blocks = model.model.layers

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + vector.to(output[0].dtype), *output[1:])
        return output + vector.to(output.dtype)

    handle = blocks[block].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
