"""Engrams: extraction, pooling, null prefixes, the store, geometry."""
