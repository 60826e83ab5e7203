"""LLM.int8() (Dettmers et al., 2022), simulated exactly in PyTorch.

Vector-wise int8 matmul
    each row ``i`` of ``X`` (tokens, in) gets its absmax ``c_x[i]``, each output row ``k`` of
    ``W`` (out, in) its absmax ``c_w[k]``; both are rounded to int8 codes
    ``Xq = round(127 X / c_x)``, ``Wq = round(127 W / c_w)``, multiplied with int32
    accumulation, and rescaled by the outer product of the scales::

        Y ≈ (Xq @ Wqᵀ) ⊙ (c_x c_wᵀ) / 127²

Mixed-precision decomposition
    the input columns ``O`` where any ``|x| ≥ threshold`` (6.0) — the outlier features, a handful
    of channels — are taken out of the int8 product and multiplied in 16-bit::

        Y = X[:, O] @ Ŵ[:, O]ᵀ  +  int8 product over the other columns

    ``Ŵ`` here is the dequantized int8 weight (``Wq · c_w / 127``): at inference only the int8
    weight is in memory, as in bitsandbytes' ``Linear8bitLt(has_fp16_weights=False)``.  (The
    paper's formulation keeps those columns of ``W`` in fp16; on the weights the difference is
    one int8 rounding.)  ``threshold=None`` (or ``inf``) turns the decomposition off: plain
    absmax int8, which the outliers ruin on large models.

Here the int32 accumulation is emulated in float64, exact for any in_features this course uses
(|sum| ≤ 127² · in_features ≪ 2⁵³), the 16-bit path casts ``X[:, O]`` to fp16 and computes in
float32.  :func:`int8_vectorwise` equals ``bitsandbytes.functional.int8_vectorwise_quant``
(tested).  One deliberate difference from bitsandbytes' CPU kernel: there, the row absmax of the
int8 part is taken after zeroing only the outlier *entries* (so sub-threshold values of an
outlier column still count); here after removing the outlier *columns*, as the paper writes it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgellm.quant.formats import int8_vectorwise, int8_vectorwise_dequant
from edgellm.quant.qtensor import QTensor, QuantError

__all__ = ["int8_vectorwise", "int8_vectorwise_dequant", "outlier_columns", "llm_int8_matmul",
           "Int8Linear", "apply_llm_int8", "llm_int8_report", "check_threshold"]


def check_threshold(threshold) -> float | None:
    """``None`` / inf / 0 → no decomposition (``None``); otherwise a positive float."""
    if threshold is None:
        return None
    t = float(threshold)
    if math.isnan(t) or t < 0:
        raise QuantError(f"threshold={threshold} must be a positive magnitude (LLM.int8 uses "
                         "6.0), or None / inf for absmax int8 without decomposition")
    return None if (math.isinf(t) or t == 0) else t


def outlier_columns(X: torch.Tensor, threshold: float | None = 6.0) -> torch.Tensor:
    """Indices (int64) of the columns of ``X`` (tokens, in) holding any ``|x| ≥ threshold``."""
    threshold = check_threshold(threshold)
    if threshold is None:
        return torch.empty(0, dtype=torch.long)
    return torch.nonzero((X.abs() >= threshold).any(0)).flatten()


def _safe_vectorwise(A: torch.Tensor, stats_from: torch.Tensor | None = None):
    """:func:`int8_vectorwise` with all-zero rows giving zero codes (not NaN); the row absmax
    is taken over ``stats_from`` (default ``A``)."""
    stats = (A if stats_from is None else stats_from).abs().amax(dim=-1).float()
    safe = torch.where(stats == 0, torch.ones_like(stats), stats)
    codes = torch.round(A * (127.0 / safe.unsqueeze(-1)))
    return codes.to(torch.int8), stats


def quantize_weight(W: torch.Tensor):
    """Per-output-row absmax int8 of ``W`` (out, in) cast to fp16 first, as bitsandbytes does:
    ``(codes int8 (out, in), c_w float32 (out,))``."""
    return _safe_vectorwise(W.detach().half())


def llm_int8_matmul(X: torch.Tensor, W: torch.Tensor | None = None, threshold: float | None = 6.0,
                    *, W_codes: torch.Tensor | None = None, W_stats: torch.Tensor | None = None,
                    bnb_compat: bool = False):
    """``Y ≈ X @ Wᵀ`` the LLM.int8() way; returns ``(Y float32 (tokens, out), n_outlier_cols)``.

    ``X`` (tokens, in), any float dtype (cast to fp16 first, like bitsandbytes); either ``W``
    (out, in) or its int8 codes and row absmax (``W_codes``, ``W_stats`` from
    :func:`quantize_weight`).  ``threshold=None`` / inf: no decomposition.  ``bnb_compat=True``
    takes the row absmax of the int8 part as bitsandbytes' CPU kernel does (over the entries
    below the threshold, outlier columns included; see the module docstring).
    """
    threshold = check_threshold(threshold)
    if W_codes is None:
        if W is None:
            raise QuantError("llm_int8_matmul needs W or (W_codes, W_stats)")
        W_codes, W_stats = quantize_weight(W)
    Xh = X.detach().reshape(-1, X.shape[-1]).half()  # (n, in) fp16, as the kernel sees it
    cols = outlier_columns(Xh, threshold)
    X8 = Xh
    if cols.numel():
        X8 = Xh.clone()
        X8[:, cols] = 0  # the int8 part never sees the outlier columns
    stats_from = None
    if bnb_compat and cols.numel():
        stats_from = Xh.masked_fill(Xh.abs() >= threshold, 0)
    Xq, c_x = _safe_vectorwise(X8, stats_from)
    acc = Xq.double() @ W_codes.double().T  # exact int32 accumulation (tokens, out)
    Y = acc.float() * (c_x.unsqueeze(1) * W_stats.unsqueeze(0)) / (127.0 * 127.0)
    if cols.numel():
        W_hat = int8_vectorwise_dequant(W_codes[:, cols], W_stats)  # (out, |O|) fp32
        Y = Y + Xh[:, cols].float() @ W_hat.T  # the 16-bit outlier product
    return Y, int(cols.numel())


class Int8Linear(nn.Linear):
    """An ``nn.Linear`` computing with :func:`llm_int8_matmul`.

    ``weight`` holds the dequantized int8 weight (so :func:`edgellm.models.linear_layers` and
    size accounting see the layer); the codes and scales live in ``W_codes``, ``W_stats``.
    Statistics of the forward passes: ``calls``, ``outlier_cols`` (sum over calls),
    ``max_outlier_cols``, ``rows``.
    """

    def __init__(self, lin: nn.Linear, threshold: float | None = 6.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.threshold = check_threshold(threshold)
        codes, stats = quantize_weight(lin.weight)
        self.__dict__["W_codes"], self.__dict__["W_stats"] = codes, stats  # not in state_dict
        self.weight = nn.Parameter(int8_vectorwise_dequant(codes, stats).to(lin.weight.dtype),
                                   requires_grad=False)
        self.register_parameter("bias", lin.bias)
        self.__dict__["original"] = lin
        self.calls = self.outlier_cols = self.max_outlier_cols = self.rows = 0

    def qtensor(self) -> QTensor:
        """The stored weight as a :class:`QTensor`: int8, one fp32 scale per output row."""
        return QTensor(codes=self.W_codes, scale=(self.W_stats / 127.0).unsqueeze(1),
                       offset=torch.zeros(self.out_features, 1), shape=(self.out_features,
                       self.in_features), bits=8, group_size=self.in_features, sym=True,
                       fmt="int", scale_bits=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        Y, n_out = llm_int8_matmul(x, threshold=self.threshold, W_codes=self.W_codes,
                                   W_stats=self.W_stats)
        if self.bias is not None:
            Y = Y + self.bias.float()
        self.calls += 1
        self.outlier_cols += n_out
        self.max_outlier_cols = max(self.max_outlier_cols, n_out)
        self.rows += x.numel() // x.shape[-1]
        return Y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int8 vector-wise, "
                f"threshold={self.threshold}")


def apply_llm_int8(model: nn.Module, threshold: float | None = 6.0, *,
                   layers: dict[str, nn.Linear] | None = None) -> dict[str, QTensor]:
    """Replace the decoder linears by :class:`Int8Linear`; return ``{name: QTensor}``
    (the int8 weights, for size accounting).  ``threshold=None``: absmax int8, no outliers."""
    from edgellm.models import linear_layers
    from edgellm.quant.modules import replace_module

    threshold = check_threshold(threshold)
    layers = linear_layers(model) if layers is None else layers
    out = {}
    for name, lin in layers.items():
        lin = lin.original if isinstance(lin, Int8Linear) else lin
        mod = Int8Linear(lin, threshold)
        replace_module(model, name, mod)
        out[name] = mod.qtensor()
    return out


def llm_int8_report(model: nn.Module) -> dict:
    """Outlier columns the :class:`Int8Linear` layers met in the forward passes so far.

    ``outlier_cols_per_layer``: {name: mean outlier columns per call}; ``outlier_cols_mean``:
    their mean over the layers; ``outlier_cols_max``: the largest count in one call;
    ``outlier_frac``: the mean fraction of the input columns computed in 16-bit.
    """
    per, fracs, mx = {}, [], 0
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear) and m.calls:
            mean = m.outlier_cols / m.calls
            per[name] = mean
            fracs.append(mean / m.in_features)
            mx = max(mx, m.max_outlier_cols)
    return {"threshold": next((m.threshold for m in model.modules()
                               if isinstance(m, Int8Linear)), None),
            "outlier_cols_per_layer": per,
            "outlier_cols_mean": sum(per.values()) / len(per) if per else 0.0,
            "outlier_cols_max": mx,
            "outlier_frac": sum(fracs) / len(fracs) if fracs else 0.0}
