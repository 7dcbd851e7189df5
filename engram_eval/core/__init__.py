"""The lowest layer: one-line errors, atomic file writes, the registries and the spec."""
