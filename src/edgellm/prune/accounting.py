"""Honest accounting: what pruning buys in bytes and in speed on this machine.

* Unstructured zeros stored densely cost exactly as much as the weights they replaced; they
  only save memory in a sparse format (here: the kept values plus a 1-bit-per-weight bitmask).
* N:M keeps ``n`` of every ``m`` values plus a ``ceil(log2 m)``-bit index per kept value
  (2:4 in fp16: 16 + 2 bits per kept weight, i.e. 9 bits per weight instead of 16).
* A dense matmul does the same work whatever the values are: unstructured sparsity does not
  speed it up.  Structured pruning shrinks the matrices and does.  PyTorch has no CPU kernel for
  2:4 semi-structured sparsity (``to_sparse_semi_structured`` needs a CUDA GPU), so 2:4 speed
  cannot be measured here.
"""

from __future__ import annotations

import math

import torch

from edgellm.measure import best_seconds
from edgellm.prune.layers import prunable_linears


def model_bytes(model) -> int:
    """Bytes of all parameters and buffers as stored (dense), tied tensors counted once."""
    from edgellm.models import param_bytes_by_dtype

    return sum(param_bytes_by_dtype(model).values())


def sparse_storage(model, nm: tuple[int, int] | None = None, *, value_bits: int | None = None) -> dict:
    """Bytes of the model with its pruned linears in a compressed sparse format.

    ``nm=(n, m)``: kept values + ``ceil(log2 m)``-bit indices; otherwise kept values + a bitmask
    (1 bit per weight).  ``value_bits`` defaults to the weights' own dtype width.  The other
    tensors (embedding, norms) are counted dense.
    """
    lins = prunable_linears(model)
    dense_total = model_bytes(model)
    lin_dense, lin_sparse = 0, 0.0
    for lin in lins.values():
        w = lin.weight
        vb = value_bits or w.element_size() * 8
        nnz = int((w != 0).sum())
        lin_dense += w.numel() * w.element_size()
        if nm is not None:
            n, m = nm
            kept = w.numel() * n // m
            lin_sparse += kept * (vb + math.ceil(math.log2(m))) / 8
        else:
            lin_sparse += nnz * vb / 8 + w.numel() / 8
    return {"size_bytes_dense": dense_total,
            "size_bytes_sparse": int(dense_total - lin_dense + lin_sparse),
            "sparse_format": f"{nm[0]}:{nm[1]} values + index" if nm else "values + bitmask"}


@torch.inference_mode()
def matmul_speed(shape=(1536, 576), *, sparsity: float = 0.5, n_tokens: int = 512,
                 repeats: int = 10, seed: int = 0) -> dict:
    """Dense matmul time of a dense matrix vs the same matrix with ``sparsity`` zeros vs a matrix
    with ``sparsity`` of its rows removed (structured); plus torch.sparse CSR for comparison.

    Returns seconds per matmul (best of ``repeats``) for each: zeros in a dense matrix cost the
    same time, a smaller matrix costs less.
    """
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(n_tokens, in_f, generator=g)
    Wz = W * (torch.rand(out_f, in_f, generator=g) >= sparsity)
    Ws = W[: int(out_f * (1 - sparsity))]
    Wcsr = Wz.to_sparse_csr()

    def best(fn):
        return best_seconds(fn, repeats)

    return {"shape": list(shape), "sparsity": sparsity, "n_tokens": n_tokens,
            "dense_s": best(lambda: X @ W.T), "dense_with_zeros_s": best(lambda: X @ Wz.T),
            "structured_s": best(lambda: X @ Ws.T),
            "csr_s": best(lambda: (Wcsr @ X.T).T),
            "semi_structured_2_4": "not measurable: PyTorch's 2:4 kernels need a CUDA GPU"}
