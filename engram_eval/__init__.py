"""engram-eval: measure what engram activation steering really does, at scale."""

__version__ = "0.1.0"
