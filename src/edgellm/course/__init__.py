"""The notebook machinery. This module: FAST mode and the side-by-side check every lesson prints.

- :mod:`edgellm.course.run`     execute notebooks in a fresh kernel; ``edgellm course run``
- :mod:`edgellm.course.labs`    labs: the graded ``check``, exercises generated from solutions/
- :mod:`edgellm.course.render`  the offline HTML course and its results page
"""

from __future__ import annotations

import os

import torch


def is_fast() -> bool:
    """FAST mode (``EDGELLM_FAST=1``) runs the same cells on fewer tokens, samples and steps."""
    return os.environ.get("EDGELLM_FAST", "").lower() in ("1", "true", "yes", "on")


FAST = is_fast()


def fast_or(full, fast):
    """``full`` normally, ``fast`` in FAST mode: ``n_tokens = fast_or(20_000, 2_048)``."""
    return fast if is_fast() else full


def cmp(name: str, ours, ref, *, atol: float = 1e-6, rtol: float = 1e-5) -> dict:
    """Compare a result with a reference and print exact / close / max difference.

    Returns a dict with ``exact``, ``close`` and ``max_diff`` so check cells can assert on it.
    """
    a = torch.as_tensor(ours).detach().double()
    b = torch.as_tensor(ref).detach().double()
    if a.shape != b.shape:
        print(f"{name:<32} shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
        return {"exact": False, "close": False, "max_diff": float("inf")}
    exact = bool(torch.equal(a, b))
    close = bool(torch.allclose(a, b, atol=atol, rtol=rtol))
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    print(f"{name:<32} exact: {exact!s:<5}  close: {close!s:<5}  max diff: {diff:.3g}")
    return {"exact": exact, "close": close, "max_diff": diff}
