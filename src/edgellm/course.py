"""Course helpers: FAST mode, and the side-by-side check every lesson prints."""

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


# --------------------------------------------------------------------------------------------
# executing notebooks (tests run them in FAST mode; `make course` in full mode)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def course_notebooks(*folders: str) -> list:
    """Lesson and lab notebooks in course order (by their NN_ prefix)."""
    folders = folders or ("notebooks", "solutions")
    return [p for f in folders for p in sorted((ROOT / f).glob("[0-9][0-9]_*.ipynb"))]


def execute_notebook(path, out=None, *, fast: bool = True, timeout: int = 900,
                     allow_errors: bool = False):
    """Execute a notebook top to bottom in a fresh kernel; write the executed copy to ``out``.

    Returns the executed ``nbformat`` notebook.  FAST mode is passed to the kernel through
    ``EDGELLM_FAST``; the kernel starts in the notebook's own folder.
    """
    import nbformat
    from nbclient import NotebookClient

    from .records import write_text

    path = __import__("pathlib").Path(path)
    nb = nbformat.read(path, as_version=4)
    saved = os.environ.get("EDGELLM_FAST")
    os.environ["EDGELLM_FAST"] = "1" if fast else "0"
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                allow_errors=allow_errors,
                                resources={"metadata": {"path": str(path.parent)}})
        try:
            client.execute()
        finally:
            if out is not None:
                write_text(nbformat.writes(nb), out)
    finally:
        if saved is None:
            os.environ.pop("EDGELLM_FAST", None)
        else:
            os.environ["EDGELLM_FAST"] = saved
    return nb
