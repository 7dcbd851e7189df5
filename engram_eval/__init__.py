"""engram-eval: measure what engram activation steering really does, at scale."""

__version__ = "0.1.0"

from .bank import Bank, Question, Source, load_bank  # noqa: E402
from .engram import Engram, Extraction, extract_engram  # noqa: E402
from .errors import EngramEvalError, EngramEvalWarning  # noqa: E402
from .generation import run_generate  # noqa: E402
from .geometry import compare_engrams  # noqa: E402
from .model import LoadedModel, load_model  # noqa: E402
from .pooling import chunk_mean  # noqa: E402
from .report import load_run, summarize  # noqa: E402
from .store import EngramStore, StoredEngram  # noqa: E402
from .sweep import run_sweep  # noqa: E402

__all__ = [
    "Bank", "Engram", "EngramEvalError", "EngramEvalWarning", "EngramStore", "LoadedModel", "Question", "Source",
    "StoredEngram", "Extraction", "chunk_mean", "compare_engrams", "extract_engram", "load_bank", "load_model", "load_run",
    "run_generate", "run_sweep", "summarize",
    "__version__",
]
