"""The once-by-hand check that engram-eval applies a llama.cpp control vector where llama.cpp does (docs/interop.md).

llama.cpp runs the embedded SmolLM2's own GGUF (Q4_1) through llama-cpp-python, with and without a control vector
loaded the way llama.cpp's common_control_vector_load does (direction.N -> the buffer slot of layer N, applied after
block N); engram-eval runs its dequantized copy with the same file imported. The logit change the vector causes at the
prompt's last position is compared: correlation over the vocabulary, and the same against engram-eval with the
mapping shifted by one block either way (what an off-by-one would give).

    .venv/bin/python benchmarks/llama_cpp_check.py ours OUT_DIR        # writes the vector GGUF and our logit changes
    LLAMA_PY benchmarks/llama_cpp_check.py llama OUT_DIR GGUF_MODEL    # llama.cpp's (a venv with llama-cpp-python)
    .venv/bin/python benchmarks/llama_cpp_check.py compare OUT_DIR

llama-cpp-python has no wheel for this machine; it builds from source (pip install llama-cpp-python, ~10 minutes)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

PROMPT = "The capital of France is"
BLOCK, SCALE, SEED, NORM = 12, 1.0, 0, float(__import__("os").environ.get("VECTOR_NORM", "60"))


def ours(out: Path) -> None:
    import torch

    from engram_eval.backend.model import load_model
    from engram_eval.core.spec import Method
    from engram_eval.steer.grid import vector_cells
    from engram_eval.steer.injection import CellVectors
    from engram_eval.vectors.formats import read_vector
    from engram_eval.vectors.formats.gguf import write_gguf
    from engram_eval.vectors.vector import SteeringVector

    lm = load_model("smollm2-135m", device="cpu")
    direction = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(SEED))
    direction = direction / direction.norm() * NORM
    out.mkdir(parents=True, exist_ok=True)
    write_gguf(SteeringVector({BLOCK + 1: direction}), out / "vector.gguf", "llama")  # direction.BLOCK
    vector = read_vector(out / "vector.gguf")
    ids = tuple(lm.tokenizer(PROMPT)["input_ids"])
    embeds = lm.backend.embed(torch.tensor([ids]))
    with torch.no_grad():
        base = lm.backend.full_logits(embeds)[0, -1]
        changes = {}
        for shift in (0, -1, 1):
            layer = vector.layers[0] + shift
            shifted = SteeringVector({layer: vector.directions[vector.layers[0]]})
            cells = [c for c in vector_cells("v", "k", [layer], [SCALE]) if c.role == "relevant"]
            method = Method(injection="vector-add", scaling="coefficient", vector="v")
            from engram_eval.vectors.controls import vector_raw
            steering = CellVectors(lm, vector_raw(shifted, "v", [layer]), method, ids, cells).steering(cells)
            with steering.active(lm.backend):
                changes[shift] = (lm.backend.full_logits(steering.inputs(embeds))[0, -1] - base).float().numpy()
    np.savez(out / "ours.npz", ids=np.array(ids), **{f"shift{k}": v for k, v in changes.items()})


def llama(out: Path, model_path: str) -> None:
    import ctypes

    import gguf
    import llama_cpp
    from llama_cpp import Llama

    ids = np.load(out / "ours.npz")["ids"].tolist()
    llm = Llama(model_path=model_path, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    n_embd, n_layer = llm.n_embd(), llama_cpp.llama_model_n_layer(llm.model)

    def last_logits() -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[len(ids) - 1], dtype=np.float64)

    base = last_logits()
    data = np.zeros(n_embd * n_layer, dtype=np.float32)  # common_control_vector_load: slot (N - 1) holds direction.N
    for tensor in gguf.GGUFReader(out / "vector.gguf").tensors:
        layer = int(tensor.name.split(".")[1])
        data[(layer - 1) * n_embd:layer * n_embd] += SCALE * np.asarray(tensor.data, dtype=np.float32)
    buffer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert llama_cpp.llama_set_adapter_cvec(llm.ctx, buffer, data.size, n_embd, 1, n_layer) == 0
    np.save(out / "llama.npy", last_logits() - base)


def compare(out: Path) -> None:
    llama_change = np.load(out / "llama.npy")
    mine = np.load(out / "ours.npz")
    print(f"llama.cpp: max |logit change| {np.abs(llama_change).max():.3f}")
    for shift, label in ((0, "engram-eval, layer N+1 (the mapping)"), (-1, "engram-eval shifted to layer N"),
                         (1, "engram-eval shifted to layer N+2")):
        change = mine[f"shift{shift}"]
        r = np.corrcoef(change, llama_change)[0, 1]
        print(f"{label}: correlation {r:.4f}, max |difference| {np.abs(change - llama_change).max():.3f}")


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    {"ours": lambda: ours(folder), "llama": lambda: llama(folder, sys.argv[3]), "compare": lambda: compare(folder)}[mode]()
