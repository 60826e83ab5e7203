"""edgellm: the shared library of the on-device LLM course.

Every lesson imports from here; nothing a later lesson needs lives only in a notebook.
"""

from edgellm.course import FAST, cmp, fast_or
from edgellm.data import get_calibration, get_tokens, load_text
from edgellm.metrics import evaluate_kl, evaluate_ppl, kl_divergence, perplexity
from edgellm.models import DEFAULT_MODEL, load_model, tiny_llama

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "FAST", "cmp", "evaluate_kl", "evaluate_ppl", "fast_or", "get_calibration",
    "get_tokens", "kl_divergence", "load_model", "load_text", "perplexity", "tiny_llama",
]
