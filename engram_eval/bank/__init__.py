"""Question banks: the YAML format, dataset import, generic control texts, answer matching."""
