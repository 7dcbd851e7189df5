"""engram-eval: measure what engram activation steering really does, at scale."""

from ._version import __version__
from .bank import Bank, Question, Source, load_bank
from .engram import Engram, extract_engram
from .errors import EngramEvalError, EngramEvalWarning
from .generation import run_generate
from .geometry import compare_engrams
from .model import LoadedModel, load_model
from .pooling import chunk_mean
from .report import load_run, summarize
from .spec import Execution, Extraction, Grid, Method, Observer, SweepSpec
from .store import EngramStore, StoredEngram
from .sweep import run_sweep

__all__ = [
    "Bank", "Engram", "EngramEvalError", "EngramEvalWarning", "EngramStore", "LoadedModel", "Question", "Source",
    "StoredEngram", "Extraction", "chunk_mean", "compare_engrams", "extract_engram", "load_bank", "load_model", "load_run",
    "run_generate", "run_sweep", "summarize", "Execution", "Grid", "Method", "Observer", "SweepSpec",
    "__version__",
]
