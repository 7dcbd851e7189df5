"""engram-eval bench: speed and memory ratios measured in one run."""
