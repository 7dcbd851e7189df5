"""Steering vectors as data: per-layer residual-stream directions from other tools (llama.cpp / repeng GGUF,
steering-vectors, lm-eval's `steered` model, plain arrays), from contrastive pairs (CAA) or from stored engrams,
each mapped to engram-eval's layer numbering once, at import, and evaluated with the same controls as an engram."""
