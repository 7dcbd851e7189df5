"""engram-eval: measure what engram activation steering really does, at scale."""

from ._version import __version__
from .backend.model import LoadedModel, load_model
from .bank.banks import Bank, Question, Source, load_bank
from .core.errors import EngramEvalError, EngramEvalWarning
from .core.spec import Execution, Extraction, Grid, Method, Observer, SweepSpec
from .engram.extraction import Engram, extract_engram
from .engram.geometry import compare_engrams
from .engram.pooling import chunk_mean
from .engram.store import EngramStore, StoredEngram
from .report.summary import load_run, summarize
from .run.generation import run_generate
from .run.sweep import run_sweep

__all__ = [
    "Bank", "Engram", "EngramEvalError", "EngramEvalWarning", "EngramStore", "LoadedModel", "Question", "Source",
    "StoredEngram", "Extraction", "chunk_mean", "compare_engrams", "extract_engram", "load_bank", "load_model", "load_run",
    "run_generate", "run_sweep", "summarize", "Execution", "Grid", "Method", "Observer", "SweepSpec",
    "__version__",
]
