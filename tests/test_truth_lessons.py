"""The numbers lessons 01, 05 and 06 state, pinned: the protocol restriction of lesson 01, the byte
accounting of lesson 05, the records lesson 06 reads."""

import math

import pytest
import torch

from edgellm.metrics import (
    EvalError,
    llamacpp_positions,
    ppl_from_nll,
    restrict_to_positions,
    scored_positions,
    token_logprobs,
    windows,
)

# --------------------------------------------------------------------------------------------
# lesson 01: the llamacpp / sliding gap is which tokens are scored, not how much context


@pytest.mark.fast
def test_scored_positions_follow_the_windows():
    pos = scored_positions(2048, "llamacpp", 512)
    assert pos.tolist() == [p for i in range(4) for p in range(512 * i + 257, 512 * i + 512)]
    assert torch.equal(llamacpp_positions(2048, 512), pos)
    sl = scored_positions(2048, "sliding", 512, 256)
    assert sl.tolist() == list(range(1, 2048))  # every token after the first, once
    assert len(scored_positions(1000, "gptq", 100)) == sum(w.n_scored for w in windows(1000, "gptq", 100))


@pytest.mark.fast
def test_restrict_to_positions_checks_its_input():
    pos = scored_positions(2048, "gptq", 512)
    with pytest.raises(EvalError, match="never scored"):
        # gptq scores positions 1..511 of each window: token 512 (a window's first) never is
        restrict_to_positions(torch.zeros(len(pos)), pos, torch.tensor([512]))
    with pytest.raises(EvalError, match="values for"):
        restrict_to_positions(torch.zeros(3), pos, pos[:2])


def _restricted_vs_llamacpp(model, tokens, ctx):
    n = len(tokens)
    sl = token_logprobs(model, tokens, "sliding", ctx, stride=ctx // 2, progress=False)
    lc = token_logprobs(model, tokens, "llamacpp", ctx, progress=False)
    sl_pos = scored_positions(n, "sliding", ctx, ctx // 2)
    restricted = restrict_to_positions(sl["nll"], sl_pos, llamacpp_positions(n, ctx))
    return sl, lc, sl_pos, restricted


@pytest.mark.fast
def test_sliding_restricted_to_llamacpp_positions_is_llamacpp_tiny(tiny):
    tokens = torch.randint(3, 256, (1024,), generator=torch.Generator().manual_seed(0))
    sl, lc, sl_pos, restricted = _restricted_vs_llamacpp(tiny, tokens, 128)
    assert torch.allclose(restricted, lc["nll"], atol=1e-5, rtol=0)  # token by token
    assert ppl_from_nll(restricted)["ppl"] == pytest.approx(ppl_from_nll(lc["nll"])["ppl"], rel=1e-6)
    # positions shifted by one token: a different set of tokens, a different PPL
    shifted = restrict_to_positions(sl["nll"], sl_pos, llamacpp_positions(1024, 128) - 1)
    assert not torch.allclose(shifted, lc["nll"], atol=1e-3)


def test_sliding_restricted_to_llamacpp_positions_is_llamacpp_real(default_model):
    """On the real model (2048 tokens of the pydoc test split, ctx 512 / stride 256)."""
    from edgellm.data import get_tokens

    model, tok = default_model
    tokens = get_tokens("pydoc", tok, "test", 2048)
    sl, lc, sl_pos, restricted = _restricted_vs_llamacpp(model, tokens, 512)
    assert ppl_from_nll(restricted)["ppl"] == pytest.approx(ppl_from_nll(lc["nll"])["ppl"], rel=1e-6)
    shifted = restrict_to_positions(sl["nll"], sl_pos, llamacpp_positions(2048, 512) - 1)
    assert not math.isclose(ppl_from_nll(shifted)["ppl"], ppl_from_nll(lc["nll"])["ppl"],
                            rel_tol=1e-3)


@pytest.mark.fast
def test_mean_context_384_vs_377():
    """Lesson 01's statement: at ctx 512 / stride 256 on the pydoc test split (11,377 tokens,
    recorded n_tokens of sliding + 1) the mean contexts are 384 (llamacpp) and 377 (sliding)."""
    from edgellm.lessons.perplexity import context_per_token
    from edgellm.results import load_records

    recs = {r["protocol"]: r for r in load_records("01_protocols")}
    n = recs["sliding"]["n_tokens"] + 1
    assert len(context_per_token(n, "llamacpp", 512)) == recs["llamacpp"]["n_tokens"]
    assert round(context_per_token(n, "llamacpp", 512).double().mean().item()) == 384
    assert round(context_per_token(n, "sliding", 512, 256).double().mean().item()) == 377


# --------------------------------------------------------------------------------------------
# lesson 05: byte accounting and the 4-bit data types end to end


def test_amdahl_table_of_the_default_model(default_model):
    """538 MB fp32 -> 173 MB with 4.5-bit linears per decoded token (3.1x, the linears alone 7.1x);
    the fp32 tied lm_head is 21 % of the fp32 model, 65 % of the 4-bit one."""
    from edgellm.lessons.production import decode_bytes_table
    from edgellm.results import load_records

    fp32, q = decode_bytes_table(default_model[0], bits_per_weight=4.5)
    assert round(fp32["bytes_per_token"] / 1e6) == 538 and round(q["bytes_per_token"] / 1e6) == 173
    assert round(fp32["lm_head_bytes"] / 1e6) == 113
    assert round(100 * fp32["lm_head_share"]) == 21 and round(100 * q["lm_head_share"]) == 65
    assert round(q["bound"], 1) == 3.1 and round(q["linears_ratio"], 1) == 7.1
    nf4 = next(r for r in load_records("05_bnb") if r["mode"] == "nf4" and not r.get("double_quant"))
    assert q["bytes_per_token"] == pytest.approx(nf4["memory_bytes"], rel=1e-3)  # what bnb holds
    assert round(nf4["decode_tokens_per_s"] / nf4["decode_tokens_per_s_base"], 1) == 1.6


@pytest.mark.fast
def test_amdahl_table_counts_each_tensor_once(tiny):
    from edgellm.lessons.production import decode_bytes_table, format_decode_bytes
    from edgellm.models import linear_layers

    fp32, q = decode_bytes_table(tiny, bits_per_weight=4.0)
    lin = sum(m.weight.numel() for m in linear_layers(tiny).values())
    assert fp32["linears_bytes"] == 4 * lin and q["linears_bytes"] == lin / 2
    assert fp32["bytes_per_token"] == 4 * sum(p.numel() for p in tiny.parameters())  # tied: once
    assert q["bound"] == pytest.approx(fp32["bytes_per_token"] / q["bytes_per_token"])
    assert "measured" in format_decode_bytes([fp32, q], 1.5)


@pytest.mark.fast
def test_qlora_ordering_end_to_end_and_asym_int4():
    """Lesson 05's numbers: NF4 10.96 < E2M1 11.34 < INT4 11.61 end to end; asymmetric INT4 11.53
    loses to NF4 by 0.051 nats of ΔNLL (2.8 of its standard errors)."""
    from edgellm.results import load_records

    ours = {r["mode"]: r for r in load_records("05_bnb") if r.get("library") == "edgellm"}
    ppl = {m: round(r["ppl"], 2) for m, r in ours.items()}
    assert (ppl["nf4"], ppl["fp4_e2m1"], ppl["int4"], ppl["int4_asym"], ppl["fp4"]) == (
        10.96, 11.34, 11.61, 11.53, 12.70)
    gap = ours["int4_asym"]["delta_nll"] - ours["nf4"]["delta_nll"]
    assert round(gap, 3) == 0.051
    assert round(gap / ours["int4_asym"]["delta_nll_stderr"], 1) == 2.8
    se_ind = math.hypot(ours["int4_asym"]["delta_nll_stderr"], ours["nf4"]["delta_nll_stderr"])
    assert round(gap / se_ind, 1) == 2.0


# --------------------------------------------------------------------------------------------
# lesson 06: the paired mask comparison


@pytest.mark.fast
def test_mask_comparison_rows():
    from edgellm.lessons.pruning import contextual_table, mask_comparison

    prune = {"command": "edgellm prune --calib pydoc", "calib": "pydoc", "data": "pydoc",
             "ppl": 20.0, "ppl_base": 9.0}
    kl = {"command": "edgellm kl --model a --reference b", "data": "pydoc", "model": "a",
          "reference": "b", "delta_nll": 0.02, "delta_nll_stderr": 0.005, "kl_mean": 0.1,
          "n_tokens": 8176, "ppl": 21.0}
    assert contextual_table([prune, kl]) == {"dense": {"pydoc": 9.0}, "pydoc": {"pydoc": 20.0}}
    (row,) = mask_comparison([prune, kl])
    assert row["z"] == pytest.approx(4.0) and row["ci95"] == pytest.approx((0.0102, 0.0298))
    # the same comparison made in one prune run (--baseline-calib): mask stdlib minus mask pydoc
    both = {"command": "edgellm prune --calib stdlib --baseline-calib pydoc", "calib": "stdlib",
            "baseline_calib": "pydoc", "data": "stdlib", "ppl": 30.0, "ppl_base": 12.0,
            "delta_nll_vs_baseline": -0.03, "delta_nll_vs_baseline_stderr": 0.01,
            "kl_mean_vs_baseline": 0.2, "n_tokens": 8176}
    (row,) = mask_comparison([prune, both])
    assert (row["model"], row["reference"], row["data"]) == ("stdlib", "pydoc", "stdlib")
    assert row["z"] == pytest.approx(-3.0) and row["kl_mean"] == 0.2
    assert contextual_table([prune, both])["stdlib"] == {"stdlib": 30.0}


@pytest.mark.fast
def test_contextual_sweep_is_paired_on_8k_tokens_per_domain():
    """Lesson 06 states only what the paired interval supports: the sweep evaluates >= 8k tokens
    per domain and compares the two masks directly on each domain (``--baseline-calib``)."""
    from edgellm.lessons.pruning import contextual_table, mask_comparison
    from edgellm.results import load_records

    recs = load_records("06_contextual")
    rows = mask_comparison(recs)
    if not rows:
        pytest.skip("06_contextual predates the paired comparison: `edgellm results --run 06_contextual`")
    assert sorted(r["data"] for r in rows) == ["pydoc", "stdlib"]
    assert all(r["n_tokens"] >= 8000 for r in recs)
    t = contextual_table(recs)
    assert set(t) == {"dense", "pydoc", "stdlib"} and all(len(v) == 2 for v in t.values())
    for r in rows:  # the kl record's ΔNLL is the difference of the two prune records' NLL
        a = next(x for x in recs if x.get("calib") == "pydoc" and x["data"] == r["data"])
        b = next(x for x in recs if x.get("calib") == "stdlib" and x["data"] == r["data"])
        assert r["delta_nll"] == pytest.approx(b["nll"] - a["nll"], abs=1e-5)
    # the verdicts lesson 06 states: on code the code-calibrated mask is better (the 95 %
    # interval excludes 0); on prose no difference is resolved
    by = {r["data"]: r for r in rows}
    assert by["stdlib"]["ci95"][1] < 0 < by["pydoc"]["ci95"][1] and by["pydoc"]["ci95"][0] < 0


@pytest.mark.fast
def test_lessons_02_and_04_print_the_same_kurtosis():
    """Raw kurtosis (3 for a Gaussian) in both lessons: tail_stats' raw_kurtosis and the rotation
    lesson's E[x⁴]/E[x²]² agree on a zero-mean Gaussian."""
    from edgellm.lessons.formats import tail_stats

    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = tail_stats(x)
    assert s["raw_kurtosis"] == pytest.approx(3.0, abs=0.05)
    assert s["raw_kurtosis"] == pytest.approx(s["kurtosis"] + 3, abs=1e-9)
    assert (x.pow(4).mean() / x.square().mean().square()).item() == pytest.approx(
        s["raw_kurtosis"], abs=0.01)


def test_the_three_dense_ppls_lesson_06_explains_are_the_records_slices():
    """Lesson 06's 'Which dense PPL?': 9.72 on the whole split (lesson 01), 8.64 on the first
    2048 tokens (lessons 03-05), 9.70 on the first 8192 (lessons 06-08), same protocol and ctx."""
    from edgellm.results import load_records

    whole = next(r for r in load_records("01_protocols") if r["protocol"] == "gptq")
    assert (round(whole["ppl"], 2), whole["n_tokens"], whole["ctx"]) == (9.72, 11242, 512)
    for name in ("03_w4g64", "06_contextual", "08_ratio"):
        recs = [r for r in load_records(name) if r.get("data", "pydoc") == "pydoc"]
        if not recs:
            pytest.skip(f"{name} not recorded")
        want = {"03_w4g64": (8.64, 2044), "06_contextual": (9.70, 8176), "08_ratio": (9.70, 8176)}
        assert {(round(r["ppl_base"], 2), r["n_tokens"]) for r in recs} == {want[name]}, name
        assert {(r["protocol"], r["ctx"]) for r in recs} == {("gptq", 512)}


def test_lesson_06_reads_the_sensitivity_allocation_as_recorded():
    from edgellm.lessons.pruning import allocation_rows
    from edgellm.results import load_records

    alloc = load_records("06_sensitivity")
    if not alloc:
        pytest.skip("06_sensitivity not recorded")
    rows = {r["sparsity"]: r for r in allocation_rows(alloc, load_records("06_sparsity"))}
    assert rows[0.5]["verdict"] == rows[0.7]["verdict"] == "allocation better"
    assert (round(rows[0.5]["ppl_uniform"], 2), round(rows[0.5]["ppl"], 2)) == (19.21, 17.82)
    assert (round(rows[0.7]["ppl_uniform"], 1), round(rows[0.7]["ppl"], 1)) == (323.7, 140.9)
    assert abs(rows[0.5]["sparsity_achieved"] - 0.5) < 0.001
    assert rows[0.5]["most_sensitive"][-1] == 0
