"""LLM.int8(): vector-wise int8 matmul with fp16 outlier columns, against bitsandbytes.

(``int8_vectorwise`` itself is checked against ``bnb.functional.int8_vectorwise_quant`` in
tests/test_quant_formats.py.)
"""

import math

import pytest
import torch

from edgellm.quant.llm_int8 import (
    Int8Linear,
    apply_llm_int8,
    check_threshold,
    int8_vectorwise,
    llm_int8_matmul,
    llm_int8_report,
    outlier_columns,
    quantize_weight,
)
from edgellm.quant.qtensor import QuantError


def _data(seed=0, n=40, d_in=256, d_out=96, outliers=(3, 77)):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g)
    X[:, list(outliers)] *= 12  # outlier features: whole columns reach |x| >= 6
    W = torch.randn(d_out, d_in, generator=g) / 16
    return X, W


def test_int8_product_is_the_exact_integer_matmul_rescaled():
    X, W = _data(outliers=())
    X = X.clamp(-5.9, 5.9)  # no column reaches the threshold
    Y, n_out = llm_int8_matmul(X, W, threshold=6.0)
    assert n_out == 0
    Xq, cx = int8_vectorwise(X.half())
    Wq, cw = quantize_weight(W)
    acc = Xq.long() @ Wq.long().T  # int64: the exact integer accumulation
    ref = acc.float() * (cx[:, None] * cw[None, :]) / 127 ** 2
    assert torch.equal(Y, ref)


def test_outlier_columns_are_found_and_decomposition_helps():
    X, W = _data()
    X[5, 100] = 9.0  # a single large entry makes its whole column an outlier column
    assert outlier_columns(X, 6.0).tolist() == [3, 77, 100]
    Y_ref = X @ W.T
    Y, n_out = llm_int8_matmul(X, W, 6.0)
    Y0, n0 = llm_int8_matmul(X, W, None)
    assert n_out == 3 and n0 == 0
    err, err0 = (Y - Y_ref).abs().max(), (Y0 - Y_ref).abs().max()
    assert err < err0 / 4  # the outliers stretch every row's scale without decomposition
    assert torch.equal(llm_int8_matmul(X, W, math.inf)[0], Y0)
    assert torch.equal(llm_int8_matmul(X, W, 0)[0], Y0)


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_threshold(bad):
    with pytest.raises(QuantError, match="must be a positive magnitude"):
        check_threshold(bad)


def _bnb_linear(lin, threshold):
    import bitsandbytes as bnb

    m = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            has_fp16_weights=False, threshold=threshold)
    m.load_state_dict(lin.state_dict())
    # eval(): in training mode bitsandbytes' CPU path dequantizes the weight and runs a plain
    # fp matmul (MatMul8bitFp) instead of the int8 one
    return m.to("cpu").eval()


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_matches_bitsandbytes_linear8bitlt(threshold):
    X, W = _data(seed=1)
    lin = torch.nn.Linear(256, 96)
    with torch.no_grad():
        lin.weight.copy_(W)
    bnb_lin = _bnb_linear(lin, threshold)
    with torch.no_grad():
        y_bnb = bnb_lin(X.half()).float()  # fp16 output
        ours = Int8Linear(lin, threshold or None)
        assert torch.equal(ours.W_codes, bnb_lin.state.CB)  # same int8 weight, same scales
        assert torch.equal(ours.W_stats, bnb_lin.state.SCB)
        Y_compat, n = llm_int8_matmul(X, threshold=threshold, W_codes=ours.W_codes,
                                      W_stats=ours.W_stats, bnb_compat=True)
        y_ours = ours(X)
    ulp = y_bnb.abs().max().item() * 2 ** -10  # one fp16 ulp at the output's largest magnitude
    # bitsandbytes' row-absmax convention: equal up to bitsandbytes' fp16 output rounding
    assert (Y_compat + lin.bias - y_bnb).abs().max() <= ulp
    if threshold == 0.0:  # no decomposition: both conventions coincide
        assert n == 0 and (y_ours - y_bnb).abs().max() <= ulp
    else:  # the paper's convention: close (measured 0.6 % of max|Y|), and no farther from fp32
        assert n == 2
        assert (y_ours - y_bnb).abs().max() <= 0.02 * y_bnb.abs().max()
        y_ref = lin(X)
        assert (y_ours - y_ref).abs().max() <= 1.2 * (y_bnb - y_ref).abs().max()


def test_int8_linear_and_apply(tiny):
    from edgellm.models import linear_layers

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny(ids).logits
    qts = apply_llm_int8(tiny, threshold=6.0)
    lins = linear_layers(tiny)
    assert len(qts) == len(lins) == 14 and all(isinstance(m, Int8Linear) for m in lins.values())
    qt = qts["model.layers.0.mlp.down_proj"]
    assert qt.bits == 8 and qt.sym and qt.group_size == 128 and qt.scale_bits == 32
    assert qt.bpw == 8 + 32 / 128
    # the module's weight is the dequantized int8 weight
    assert torch.equal(lins["model.layers.0.mlp.down_proj"].weight, qt.dequantize())
    with torch.no_grad():
        y = tiny(ids).logits
    assert 0 < (y - ref).abs().max() < 0.05 * ref.abs().max()
    rep = llm_int8_report(tiny)
    assert rep["threshold"] == 6.0 and len(rep["outlier_cols_per_layer"]) == 14
    assert rep["outlier_cols_max"] == 0  # a random tiny model has no |x| >= 6
    with torch.no_grad():
        tiny.model.layers[1].post_attention_layernorm.weight[3] = 500.0  # plant one
        tiny(ids)
    rep = llm_int8_report(tiny)
    assert rep["outlier_cols_max"] >= 1
    assert rep["outlier_cols_per_layer"]["model.layers.1.mlp.gate_proj"] > 0


@pytest.mark.integration
def test_real_model_has_outlier_columns(default_model):
    import copy

    model, tok = default_model
    m = copy.deepcopy(model)
    apply_llm_int8(m, threshold=6.0)
    ids = tok("import os\nprint(os.path.join('a', 'b'))\n" * 6, return_tensors="pt").input_ids
    with torch.no_grad():
        m(ids[:, :96])
    rep = llm_int8_report(m)
    per = rep["outlier_cols_per_layer"]
    # measured: outliers sit mostly at the down_proj inputs (the MLP's SiLU(gate) * up)
    downs = sum(v for n, v in per.items() if n.endswith("down_proj"))
    assert downs > 0 and rep["outlier_cols_max"] >= 1
    assert rep["outlier_frac"] < 0.05  # a few columns: most of the work stays in int8
