"""Low-rank factorization: Eckart–Young, ASVD folding, SVD-LLM whitening beats plain SVD on the
layer output, LowRankLinear, save / load, LoRC, rank planning and bad input (tiny model)."""

import copy
import warnings

import pytest
import torch

from edgellm.errors import EdgeLLMError
from edgellm.hessian import HessianError, from_inputs
from edgellm.lowrank.apply import (
    apply_lorc,
    bpw_of,
    check_options,
    factorize_model,
    linear_shapes,
    plan_ranks,
    ranks_from_sensitivity,
    shapes_from_config,
)
from edgellm.lowrank.asvd import asvd_factors
from edgellm.lowrank.layers import LowRankLinear, load_factorized, ranks_of, save_factorized
from edgellm.lowrank.lorc import lorc_bpw, lorc_error, lorc_factors
from edgellm.lowrank.svd import (
    LowRankError,
    LowRankWarning,
    break_even_rank,
    check_rank,
    energy_curve,
    energy_kept,
    rank_for_ratio,
    tail_energy,
    truncated_svd,
    warn_rank,
)
from edgellm.lowrank.svdllm import svdllm_factors, whitening
from edgellm.quant.rtn import fake_quantize


def _toy(out=48, n=64, tokens=512, seed=0):
    """Weights and strongly correlated inputs with a few large channels (like an LLM's)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g)
    X = torch.randn(tokens, n // 4, generator=g) @ torch.randn(n // 4, n, generator=g)
    X = X + 0.05 * torch.randn(tokens, n, generator=g)
    X[:, :3] *= 20  # outlier channels
    return W, X


def _out_err(W, B, A, X):
    return float((X.double() @ (W.double() - B.double() @ A.double()).T).square().sum())


# --------------------------------------------------------------------------------------------
# the maths


@pytest.mark.parametrize("rank", [1, 5, 20, 47])
def test_svd_error_is_the_tail_energy(rank):
    W, _ = _toy()
    B, A = truncated_svd(W, rank)
    assert B.shape == (48, rank) and A.shape == (rank, 64)
    err = float((W.double() - B.double() @ A.double()).square().sum())
    assert err == pytest.approx(tail_energy(W, rank), rel=1e-4)
    S = torch.linalg.svdvals(W.double())
    assert energy_kept(S, rank) == pytest.approx(1 - tail_energy(W, rank) / float(S.square().sum()))
    assert float(energy_curve(S)[-1]) == pytest.approx(1.0)


def test_break_even_and_ratio_arithmetic():
    assert break_even_rank(576, 576) == 288
    assert break_even_rank(192, 576) == 144
    assert break_even_rank(1536, 576) == pytest.approx(418.9, abs=0.1)
    assert rank_for_ratio(576, 576, 0.2) == 230  # 0.8 · 288
    assert check_rank(576, 576, 287) is None
    assert "break-even" in check_rank(576, 576, 288)
    with pytest.warns(LowRankWarning, match="288"):
        warn_rank(576, 576, 300)


@pytest.mark.parametrize("bad", [0, -3, 48, 60, 2.5])
def test_bad_ranks(bad):
    W, _ = _toy()
    with pytest.raises(LowRankError):
        truncated_svd(W, bad)


def test_asvd_folds_the_scale_back_exactly():
    W, X = _toy()
    mean_abs = X.abs().mean(0)
    s = mean_abs.double().sqrt()  # α = 0.5
    # folding: (B A) S is exactly the truncated SVD of W S, so B A = [W S]_r S⁻¹
    B, A = asvd_factors(W, mean_abs, 30)
    Bs, As = truncated_svd((W.double() * s).float(), 30)
    assert torch.allclose((B.double() @ A.double()) * s, Bs.double() @ As.double(), atol=1e-4)
    # and the truncation is Eckart–Young on W S: (W − B A) S has exactly the tail energy
    Ws = W.double() * mean_abs.double().sqrt()
    for r in (4, 20):
        B, A = asvd_factors(W, mean_abs, r)
        err = ((W.double() - B.double() @ A.double()) * mean_abs.double().sqrt()).square().sum()
        assert float(err) == pytest.approx(tail_energy(Ws, r), rel=1e-4)
    # alpha = 0 is plain SVD
    B0, A0 = asvd_factors(W, mean_abs, 10, alpha=0.0)
    B1, A1 = truncated_svd(W, 10)
    assert torch.allclose(B0 @ A0, B1 @ A1, atol=1e-4)
    with pytest.raises(LowRankError):
        asvd_factors(W, mean_abs[:5], 10)


@pytest.mark.parametrize("rank", [4, 12, 24])
def test_whitened_svd_beats_plain_svd_on_the_layer_output(rank):
    W, X = _toy()
    H = from_inputs(X)
    Bp, Ap = truncated_svd(W, rank)
    Bw, Aw = svdllm_factors(W, H, rank)
    Ba, Aa = asvd_factors(W, X.abs().mean(0), rank)
    plain, white, act = (_out_err(W, Bp, Ap, X), _out_err(W, Bw, Aw, X), _out_err(W, Ba, Aa, X))
    assert white < 0.7 * plain
    assert white <= act * (1 + 1e-6)  # SVD-LLM is optimal for the output error
    # truncation-aware: the mean output error is exactly Σ_{i>r} σ_i(W L)² / 2
    L, _ = whitening(H)
    expect = tail_energy(W.double() @ L, rank) / 2
    assert white / X.shape[0] == pytest.approx(expect, rel=1e-3)


@pytest.mark.parametrize("shape", [(24, 64), (64, 64), (96, 32)])
def test_the_eigen_path_gives_the_factors_of_the_whitened_svd(shape):
    # the factors come from a Gram eigendecomposition; they must equal [W L]_r L⁻¹ from an SVD
    torch.manual_seed(1)
    W, X = torch.randn(*shape), torch.randn(500, shape[1]) * torch.linspace(0.1, 3, shape[1])
    H = from_inputs(X)
    L, _ = whitening(H)
    r = 10
    U, S, Vh = torch.linalg.svd(W.double() @ L, full_matrices=False)
    ref = U[:, :r] @ torch.diag(S[:r]) @ torch.linalg.solve_triangular(L, Vh[:r], upper=False,
                                                                        left=False)
    for B, A, info in (svdllm_factors(W, H, r, return_info=True),
                       svdllm_factors(W, rank=r, L=L, return_info=True)):
        assert torch.allclose((B @ A).double(), ref, atol=1e-5 * float(ref.abs().max()))
        assert info["energy_kept"] == pytest.approx(float((S[:r] ** 2).sum() / (S ** 2).sum()),
                                                    rel=1e-9)
        # √Σ on each side: B's column norms are √σ
        assert torch.allclose(B.norm(dim=0).double(), S[:r].sqrt(), rtol=1e-4)
    assert svdllm_factors(W, H, r, return_info=True)[2]["damp"] == 0.0


def test_whitening_damps_a_singular_hessian():
    W, X = _toy(tokens=10)  # 10 tokens, 64 channels: H has rank ≤ 10
    H = from_inputs(X)
    L, lam = whitening(H)
    assert lam > 0 and torch.isfinite(L).all()
    B, A = svdllm_factors(W, H, 8)
    assert torch.isfinite(B).all() and torch.isfinite(A).all()
    with pytest.raises(HessianError):
        whitening(-torch.eye(4))
    with pytest.raises(LowRankError, match="H"):
        svdllm_factors(W, torch.eye(3), 4)


def test_lowrank_linear_forward_is_b_at_a():
    W, X = _toy()
    bias = torch.randn(48)
    B, A = truncated_svd(W, 10)
    mod = LowRankLinear.from_factors(B, A, bias)
    assert torch.allclose(mod(X), X @ (B @ A).T + bias, atol=1e-4)
    assert torch.allclose(mod.dense_weight(), B @ A)
    assert sum(p.numel() for p in mod.parameters()) == 10 * (48 + 64) + 48
    with pytest.raises(LowRankError):
        LowRankLinear.from_factors(B, A[:5])


def test_lorc_error_falls_with_rank_and_bpw():
    W, _ = _toy(out=64, n=64)
    Q = fake_quantize(W, bits=3, group_size=16)
    errs = [lorc_error(W, Q)]
    for r in (1, 2, 4, 8, 16, 32):
        U, V = lorc_factors(W, Q, r)
        assert U.shape == (64, r) and V.shape == (64, r)
        errs.append(lorc_error(W, Q, U, V))
        assert errs[-1] ** 2 == pytest.approx(tail_energy(W - Q, r), rel=1e-4)
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False))
    assert lorc_bpw(576, 576, 8, 3.5) == pytest.approx(3.5 + 16 * 8 * 1152 / 576 ** 2)
    assert lorc_bpw(576, 576, 0, 4.5) == 4.5
    with pytest.raises(LowRankError):
        lorc_factors(W, Q[:3], 2)


# --------------------------------------------------------------------------------------------
# on a model


def _ids(n=4, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["svd", "asvd", "svdllm"])
def test_factorize_model_ratio(tiny, method):
    ref = copy.deepcopy(tiny)
    res = factorize_model(tiny, None if method == "svd" else _ids(), method=method, ratio=0.2)
    assert len(res.ranks) == 14 and len(ranks_of(tiny)) == 14
    assert res.ranks["model.layers.0.self_attn.q_proj"] == rank_for_ratio(64, 64, 0.2)
    assert 0.2 <= res.ratio_achieved < 0.25
    assert res.n_params_after < res.n_params_before
    assert res.n_params_before - res.n_params_after == (res.n_params_linears_before
                                                        - res.n_params_linears_after)
    assert bpw_of(res) == pytest.approx(16 * (1 - res.ratio_achieved))
    with torch.no_grad():
        out, base = tiny(_ids()).logits, ref(_ids()).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, base)
    assert linear_shapes(tiny) == {}  # nothing left to factorize
    info = res.info()
    assert info["ranks_by_role"]["q_proj"] == res.ranks["model.layers.0.self_attn.q_proj"]


def test_svdllm_beats_svd_on_the_tiny_model_output(tiny):
    ids = _ids(8, 48)
    ref = copy.deepcopy(tiny)
    errs = {}
    for method in ("svd", "svdllm"):
        m = copy.deepcopy(ref)
        factorize_model(m, ids, method=method, ratio=0.3)
        with torch.no_grad():
            errs[method] = float((m(ids).logits - ref(ids).logits).square().mean())
    assert errs["svdllm"] < errs["svd"]


def test_factorize_rank_and_per_layer_ranks(tiny):
    with pytest.warns(LowRankWarning, match="break-even"):
        res = factorize_model(copy.deepcopy(tiny), method="svd", rank=30)  # k/v 32×64: be 21.3
    assert res.warnings and all("break-even" in w for w in res.warnings)
    name = "model.layers.1.mlp.down_proj"
    res = factorize_model(tiny, method="svd", ranks={name: 8})
    assert res.ranks == {name: 8} and ranks_of(tiny) == {name: 8}
    with pytest.raises(LowRankError, match="min"):
        factorize_model(copy.deepcopy(tiny), method="svd", rank=32)  # k/v have min(m, n) = 32
    with pytest.raises(LowRankError, match="not decoder linears"):
        factorize_model(copy.deepcopy(tiny), method="svd", ranks={"model.layers.0.mlp.nope": 4})


def test_ranks_from_sensitivity_hit_the_ratio(tiny):
    shapes = linear_shapes(tiny)
    sens = {n: (10.0 if "down" in n else 1.0) for n in shapes}
    ranks = ranks_from_sensitivity(shapes, sens, 0.3)
    kept = sum(r * sum(shapes[n]) for n, r in ranks.items()) + sum(
        m * k for n, (m, k) in shapes.items() if n not in ranks)
    total = sum(m * k for m, k in shapes.values())
    assert kept == pytest.approx(0.7 * total, rel=0.05)
    down, q = "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"
    assert ranks.get(down, 10 ** 9) / break_even_rank(*shapes[down]) > \
        ranks[q] / break_even_rank(*shapes[q])
    plan, _ = plan_ranks(shapes, ranks=ranks)
    assert plan == ranks


def test_shapes_from_config_match_the_model(tiny):
    assert shapes_from_config(tiny.config) == linear_shapes(tiny)


@pytest.mark.parametrize("kw, match", [
    (dict(method="pca", ratio=0.2), "unknown method"),
    (dict(ratio=0.0), "between 0 and 1"),
    (dict(ratio=1.0), "between 0 and 1"),
    (dict(ratio="x"), "between 0 and 1"),
    (dict(rank=0), "positive"),
    (dict(rank=2.5), "positive"),
    (dict(ratio=0.2, rank=8), "exactly one"),
    (dict(), "exactly one"),
    (dict(ratio=0.2, alpha=2.0), "alpha"),
])
def test_bad_options(kw, match):
    with pytest.raises(LowRankError, match=match):
        check_options(**kw)


def test_calibrated_methods_need_calibration(tiny):
    from edgellm.calib import CalibrationError

    with pytest.raises(CalibrationError):
        factorize_model(tiny, None, method="svdllm", ratio=0.2)


def test_save_load_same_logits(tiny, tmp_path):
    factorize_model(tiny, _ids(), method="svdllm", ratio=0.25)
    folder = save_factorized(tiny, tmp_path / "m", meta={"method": "svdllm"})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    model, tok, info = load_factorized(folder)
    assert tok is None and info["method"] == "svdllm" and info["ranks"] == ranks_of(tiny)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, tiny(_ids()).logits)
        out = model.generate(_ids(1, 8), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)
    with pytest.raises(EdgeLLMError, match="not an empty folder"):  # records.write_folder
        save_factorized(tiny, folder)
    with pytest.raises(LowRankError, match="lowrank.json"):
        load_factorized(tmp_path)


def test_apply_lorc_on_rtn(tiny):
    from edgellm.quant.rtn import apply_rtn

    ref = copy.deepcopy(tiny)
    apply_rtn(tiny, bits=3, group_size=16)
    res = apply_lorc(tiny, ref, rank=4)
    assert res.info["n_layers"] == 14 and res.info["error_after"] < res.info["error_before"]
    assert res.info["bpw_added"] == pytest.approx(16 * res.info["lorc_params"] / sum(
        m.weight.numel() for n, m in ref.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n))
    with pytest.raises(LowRankError, match="no linear"):
        apply_lorc(tiny, {"model.nope": torch.zeros(2, 2)}, rank=1)


def test_no_warning_below_break_even(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowRankWarning)
        factorize_model(tiny, method="svd", ratio=0.5)


# --------------------------------------------------------------------------------------------
# LoRC through quantize_model (edgellm quantize --lorc-rank)


def test_quantize_model_lorc_rank_zero_is_plain_quantization(tiny):
    from edgellm.quant.apply import quantize_model

    other = copy.deepcopy(tiny)
    info0 = quantize_model(tiny, method="rtn", bits=3, group_size=16).info
    info = quantize_model(other, method="rtn", bits=3, group_size=16, lorc_rank=0).info
    assert info0["rank"] == info["rank"] == 0 and "lorc" not in info
    for a, b in zip(tiny.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["rtn", "gguf", "rotate"])
def test_quantize_model_lorc_fits_the_error_of_the_given_weights(tiny, method):
    from edgellm.models import linear_layers
    from edgellm.quant.apply import quantize_model

    plain = copy.deepcopy(tiny)
    kw = dict(bits=3, group_size=16) if method != "gguf" else dict(qtype="Q4_0")
    res0 = quantize_model(plain, method=method, **kw)
    res = quantize_model(tiny, method=method, lorc_rank=4, **kw)
    lorc = res.info["lorc"]
    assert res.info["rank"] == lorc["rank"] == 4 and lorc["n_layers"] == len(res.qtensors) == 14
    assert lorc["error_after"] < lorc["error_before"]
    # the model holds Q + U Vᵀ: Q is the plain run's weight, U Vᵀ its best rank-4 error fix
    lins, lins0 = linear_layers(tiny), linear_layers(plain)
    name = "model.layers.0.mlp.down_proj"
    assert not torch.equal(lins[name].weight, lins0[name].weight)
    S = torch.linalg.svdvals((lins[name].weight - lins0[name].weight).detach().double())
    assert S[4] < 1e-4 * S[0]  # rank 4, up to float32 rounding
    assert lorc["lorc_params"] == sum(4 * sum(q.shape) for q in res.qtensors.values())
    assert lorc["lorc_bytes"] == 2 * lorc["lorc_params"]
    assert res0.info["rank"] == 0


def test_lorc_size_counts_the_fp16_factors(tiny):
    from edgellm.lowrank.lorc import lorc_size
    from edgellm.quant.apply import quantize_model
    from edgellm.quant.size import model_size

    res = quantize_model(tiny, method="rtn", bits=3, group_size=16, lorc_rank=2)
    base = model_size(tiny, res.qtensors)
    rec = {**base, **lorc_size(base, res.info["lorc"], 1000)}
    n = sum(q.numel for q in res.qtensors.values())
    extra = 16 * sum(2 * sum(q.shape) for q in res.qtensors.values())  # bits of U and V
    assert rec["bpw_quant"] == base["bpw"] == pytest.approx(3 + 32 / 16)
    assert rec["bpw"] == pytest.approx(base["bpw"] + extra / n)
    assert rec["size_bytes"] == base["size_bytes"] + extra // 8
    assert rec["n_params"] == 1000 + res.info["lorc"]["lorc_params"]
    plain = lorc_size(base, None, 1000)
    assert plain == {"n_params": 1000, "lorc_params": 0, "bpw_quant": base["bpw"]}


def test_lorc_bad_input(tiny):
    from edgellm.lowrank.apply import check_lorc_rank
    from edgellm.quant.apply import check_options, quantize_model
    from edgellm.quant.qtensor import QuantError

    with pytest.raises(LowRankError, match="≥ 0"):
        check_options("rtn", lorc_rank=-1)
    for method, why in (("llm_int8", "no fake-quantized"), ("awq", "rescales")):
        with pytest.raises(QuantError, match=why):
            check_options(method, lorc_rank=4)
    check_options("gptq", lorc_rank=4)
    check_lorc_rank(0, {"a": (4, 4)})  # 0 = off, always fine
    with pytest.raises(LowRankError, match=r"k_proj \(192×576\).*below 192"):
        check_lorc_rank(192, {"q_proj": (576, 576), "k_proj": (192, 576)})
    with pytest.raises(LowRankError, match="model.layers.0.self_attn.k_proj"):
        quantize_model(tiny, method="rtn", bits=4, group_size=16, lorc_rank=32)


# --------------------------------------------------------------------------------------------
# sensitivity allocation


def test_spread_ratios_keep_the_budget_and_order_by_sensitivity():
    from edgellm.allocation import AllocationError
    from edgellm.lowrank.sensitivity import spread_ratios

    sens = {0: 0.5, 1: 0.01, 2: 0.2, 3: 0.05}
    r = spread_ratios(sens, 0.2, 0.1)
    assert r[1] == pytest.approx(0.3) and r[0] == pytest.approx(0.1)   # least / most sensitive
    assert r[3] == pytest.approx(0.2 + 0.1 / 3) and r[2] == pytest.approx(0.2 - 0.1 / 3)
    assert sum(r.values()) / len(r) == pytest.approx(0.2)
    assert spread_ratios(sens, 0.2, 0.0) == dict.fromkeys(sens, 0.2)
    with pytest.raises(AllocationError, match="spread"):
        spread_ratios(sens, 0.2, 0.2)


def test_sensitivity_scan_factorizes_one_layer_at_a_time(tiny):
    """On the tiny model: the scan leaves the model unchanged, gives one ΔNLL per layer, and
    each equals the ΔNLL of a copy with only that layer factorized by factorize_model."""
    import copy

    from edgellm.lowrank.apply import factorize_model, linear_shapes
    from edgellm.lowrank.sensitivity import budget, layer_sensitivity, ranks_for_layer_ratios
    from edgellm.metrics import token_logprobs

    torch.manual_seed(0)
    calib = torch.randint(0, 256, (4, 32))
    tokens = torch.randint(0, 256, (256,))
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    sens = layer_sensitivity(tiny, calib, tokens, method="svdllm", ratio=0.5, ctx=64)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert sorted(sens) == [0, 1]
    base = token_logprobs(tiny, tokens, "gptq", 64, progress=False)["nll"]
    for i in (0, 1):
        one = copy.deepcopy(tiny)
        factorize_model(one, calib, method="svdllm", ratio=0.5, layers=[i])
        nll = token_logprobs(one, tokens, "gptq", 64, progress=False)["nll"]
        assert sens[i] == pytest.approx(float((nll - base).mean()), abs=1e-6)
    shapes = linear_shapes(tiny)
    ranks = ranks_for_layer_ratios(shapes, {0: 0.4, 1: 0.6})
    assert budget(shapes, ranks) == pytest.approx(0.5, abs=0.05)
