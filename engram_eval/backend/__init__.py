"""The model: resolving --model and loading it, and the backend interface to its internals."""
