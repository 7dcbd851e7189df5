"""Steering a prompt: prompts, the grid of cells, injection modes, scoring."""
