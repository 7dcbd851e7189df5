"""engram-eval: measure what engram activation steering really does, at scale.

The names below are imported on first use (PEP 562), so `engram-eval --help` and `report` never load torch."""

from importlib import import_module

from ._version import __version__

_NAMES = {
    "LoadedModel": ".backend.model", "load_model": ".backend.model",
    "Bank": ".bank.banks", "Question": ".bank.banks", "Source": ".bank.banks", "load_bank": ".bank.banks",
    "EngramEvalError": ".core.errors", "EngramEvalWarning": ".core.errors",
    "Execution": ".core.spec", "Extraction": ".core.spec", "Grid": ".core.spec", "Method": ".core.spec",
    "Observer": ".core.spec", "SweepSpec": ".core.spec",
    "Engram": ".engram.extraction", "extract_engram": ".engram.extraction",
    "compare_engrams": ".engram.geometry", "chunk_mean": ".engram.pooling",
    "EngramStore": ".engram.store", "StoredEngram": ".engram.store",
    "load_run": ".report.summary", "summarize": ".report.summary", "RunSummary": ".report.run_summary",
    "run_generate": ".run.generation", "run_sweep": ".run.sweep",
}

__all__ = [*_NAMES, "__version__"]


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'engram_eval' has no attribute {name!r}")
    value = getattr(import_module(_NAMES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
