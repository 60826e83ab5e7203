"""Lesson 12's kernels: the Q4_0 grid and its two byte layouts, every GEMV variant against the
dense product, the bench's GB/s accounting, the C++ fallback, fusion and activation statistics.

Tests that compile C++ (our extension, llama.cpp's harness, torch.compile) are marked so that
``make test-fast`` leaves them out; no test asserts that one variant is faster than another."""

from __future__ import annotations

import pytest
import torch

from edgellm.kernels import q4
from edgellm.kernels.apply import (
    VARIANTS,
    bench,
    check_variants,
    llc_bytes,
    parse_shapes,
    rotating_seconds,
)
from edgellm.kernels.fusion import (
    fold_rmsnorm,
    rmsnorm,
    rmsnorm_fold_rows,
    silu_mul_rows,
    silu_mul_separate,
)
from edgellm.kernels.q4 import KernelError
from edgellm.kernels.sparsity import activation_stats, finish, jaccard, random_jaccard, summarize

# the C++ tests build the extension (about a minute the first time, cached afterwards): kept out
# of the fast tier through one of conftest's SLOW_MARKERS
needs_cpp = pytest.mark.kernels
BROKEN = "this is not C++ at all;\n"
TINY_SHAPES = [(1, 32), (37, 96), (64, 64)]


def weights(n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen), torch.randn(k, generator=gen)


def close(y: torch.Tensor, ref: torch.Tensor) -> None:
    err = (y - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item() + 1e-7, err


# --------------------------------------------------------------------------------------------
# the grid and the layouts


def test_q4_0_grid_is_llamacpp_s():
    w = torch.zeros(1, 32)
    w[0, :4] = torch.tensor([-2.0, 1.0, 0.5, 0.26])        # max |w| is negative: d = -2/-8
    codes, scales = q4.quantize_q4_0(w)
    assert scales.dtype == torch.float16 and scales.shape == (1, 1)
    assert scales.item() == 0.25
    # q = min(15, trunc(w / d + 8.5)): -2 → 0 (exact), 1 → 12, 0.5 → 10, 0.26 → 9, 0 → 8
    assert codes[0, :5].tolist() == [0, 12, 10, 9, 8]
    assert q4.dequantize(codes, scales)[0, :5].tolist() == [-2.0, 1.0, 0.5, 0.25, 0.0]
    # a positive extreme gives a negative scale: the extreme still lands on code 0
    codes, scales = q4.quantize_q4_0(-w)
    assert scales.item() == -0.25 and codes[0, 0] == 0


def test_q4_0_error_is_at_most_one_step_and_zero_groups_stay_zero():
    W, _ = weights(8, 64)
    W[3, :32] = 0
    codes, scales = q4.quantize_q4_0(W)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    err = (q4.dequantize(codes, scales) - W).abs().reshape(8, 2, 32).amax(-1)
    assert (err <= scales.float().abs() * 1.001 + 1e-6).all()
    assert (q4.dequantize(codes, scales)[3, :32] == 0).all()


def test_packing_round_trips_and_the_interleaved_bytes_are_llamacpp_s():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    rows, inter = q4.pack_rows(codes), q4.pack_interleaved(codes)
    assert rows.shape == inter.shape == (5, 32) and rows.dtype == torch.uint8
    assert torch.equal(q4.unpack_rows(rows), codes)
    assert torch.equal(q4.unpack_interleaved(inter), codes)
    assert rows[0, 0] == codes[0, 0] | codes[0, 1] << 4
    assert inter[0, 0] == codes[0, 0] | codes[0, 16] << 4
    assert inter[0, 16] == codes[0, 32] | codes[0, 48] << 4       # the second group
    scales = torch.tensor([[0.5, -1.0]] * 5, dtype=torch.float16)
    blocks = q4.q4_0_blocks(inter, scales)                           # 18 bytes per group
    assert blocks.shape == (5, 36)
    assert blocks[0, :2].tolist() == list(scales[0, :1].view(torch.uint8).tolist())
    assert torch.equal(blocks[0, 2:18], inter[0, :16])


@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_torch_variants_equal_the_dense_product(shape):
    W, x = weights(*shape)
    codes, scales = q4.quantize_q4_0(W)
    ref = q4.dense_reference(codes, scales, x)
    packed = q4.pack_rows(codes)
    close(q4.unpack_matmul(packed, scales, x), ref)
    for block_rows in (1, 5, 256):                                   # blocks not dividing N
        close(q4.torch_packed(packed, scales, x, block_rows=block_rows), ref)


def test_bad_shapes_and_variants_say_what_to_do():
    with pytest.raises(KernelError, match="multiple of 32.*use 96 or 128"):
        q4.quantize_q4_0(torch.zeros(4, 100))
    assert parse_shapes("1536x576, 49152X576") == [(1536, 576), (49152, 576)]
    for bad in ("1536", "1536x", "ax576", "0x576"):
        with pytest.raises(KernelError):
            parse_shapes(bad)
    with pytest.raises(KernelError, match="choose from"):
        check_variants(["cpp_simd", "nonesuch"])
    assert check_variants(VARIANTS) == VARIANTS


def test_llc_and_rotation():
    assert llc_bytes() >= 2 ** 20
    calls = []
    best, median = rotating_seconds(lambda i: calls.append(i), [(0,), (1,), (2,)], repeats=2)
    assert calls == [0, 1, 2] * 3 and 0 <= best <= median


def test_bench_accounts_bytes_within_the_bound():
    """The issue's check of the GB/s accounting (not of speed): no variant reads faster than
    the read bandwidth measured the same way (cache-resident on both sides here)."""
    from edgellm.measure import check_speed_keys

    rec = bench(shapes=[(64, 64), (40, 96)], variants=("unpack_matmul", "torch_packed"),
                footprint_mib=0.25, bound_mib=4, repeats=2)
    assert rec["skipped"] == {} and rec["threads"] == 1 and rec["llc_bytes"] > 0
    assert [r["name"] for r in rec["variants"]] == ["unpack_matmul", "torch_packed"] * 2
    for r in rec["variants"]:
        assert {"name", "shape", "gbytes_per_s", "fraction_of_bound", "max_abs_err",
                "seconds"} <= set(r)
        assert 0 < r["fraction_of_bound"] <= 1.05, r
        assert r["rel_err"] <= 1e-4 and r["copies"] >= 1
        assert r["bytes_per_call"] == q4.packed_bytes(*r["shape"])
    assert rec["bound_gbytes_per_s"] > 0 and rec["cpu"] and rec["cpu_capability"]
    check_speed_keys(rec)


def test_bench_without_a_compiler_falls_back_to_torch(monkeypatch):
    monkeypatch.setenv("CXX", "/no/such/c++")
    rec = bench(shapes=[(32, 64)], variants=("torch_packed", "cpp_scalar", "cpp_simd"),
                footprint_mib=0.1, bound_mib=4, repeats=1)
    assert set(rec["skipped"]) == {"cpp_scalar", "cpp_simd"}
    assert "compiler" in rec["skipped"]["cpp_scalar"]
    assert [r["name"] for r in rec["variants"]] == ["torch_packed"]


def test_cli_bench_json_keys(capsys):
    import json

    from edgellm.cli import main

    assert main(["kernels", "bench", "--shapes", "64x64", "--variants", "torch_packed",
                 "--footprint-mib", "0.1", "--bound-mib", "4", "--repeats", "1", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    (row,) = rec["variants"]
    assert row["name"] == "torch_packed" and row["max_abs_err"] < 1e-3
    assert {"gbytes_per_s", "fraction_of_bound"} <= set(row)


# --------------------------------------------------------------------------------------------
# fusion (torch parts)


def test_rmsnorm_folds_into_the_next_matmul():
    gen = torch.Generator().manual_seed(0)
    W, g, x = (torch.randn(48, 32, generator=gen), 1 + torch.randn(32, generator=gen),
               torch.randn(3, 32, generator=gen))
    unfused = rmsnorm(x, g) @ W.T
    folded = rmsnorm(x) @ fold_rmsnorm(W, g).T
    assert (unfused - folded).abs().max() < 1e-5
    rows = rmsnorm_fold_rows(hidden=32, out_features=48, calls=2, repeats=1)
    assert [r["name"] for r in rows] == ["rmsnorm_then_matmul", "rmsnorm_folded"]
    assert rows[0]["max_abs_err"] == 0 and rows[1]["max_abs_err"] < 1e-4


def test_silu_mul_rows_without_cpp_or_compile():
    rows, skipped = silu_mul_rows(intermediate=64, tokens=2, calls=2, repeats=1, ext=None,
                                  compile=False)
    assert skipped == {} and [r["name"] for r in rows] == ["silu_mul_separate"]
    assert rows[0]["max_abs_err"] == 0 and rows[0]["seconds"] > 0


# --------------------------------------------------------------------------------------------
# activation statistics


def test_known_concentration_gives_known_numbers():
    a = torch.zeros(2, 10)
    a[:, 0], a[:, 1] = 9.0, -1.0                   # 90 % of every token's mass in neuron 0
    s = summarize(a, top=0.1)
    assert s["tokens"] == 2 and s["top_mass_sum"] == pytest.approx(1.8)
    stats = finish(s, s, top=0.1)
    assert stats["top_mass_per_token"] == pytest.approx(0.9)
    assert stats["top_mass_ranked"] == pytest.approx(0.9)
    assert stats["zero_fraction"] == pytest.approx(0.8)
    assert stats["near_zero_fraction"] == pytest.approx(0.8)
    assert stats["hot_jaccard"] == 1.0
    b = torch.zeros(2, 10)
    b[:, 5] = 1.0                                  # the other half's hot neuron differs
    moved = finish(s, summarize(b, top=0.1), top=0.1)
    assert moved["hot_jaccard"] == 0.0
    assert moved["top_mass_per_token"] == pytest.approx((1.8 + 2.0) / 4)
    uniform = finish(summarize(torch.ones(4, 10)), summarize(torch.ones(4, 10)))
    assert uniform["top_mass_per_token"] == pytest.approx(0.1)
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == 0.5
    assert random_jaccard(1000, 0.1) == pytest.approx(100 / 1900)


def test_activation_stats_on_a_tiny_model(tiny):
    from conftest import random_ids

    stats = activation_stats(tiny, random_ids(4, 16), top=0.1, batch_size=2)
    assert len(stats["layers"]) == 2 and stats["hidden_act"] == "silu"
    assert stats["intermediate_size"] == 128 and stats["tokens"] == 64
    for row in stats["layers"]:
        for k, v in row.items():
            if k != "layer":
                assert 0 <= v <= 1, (k, v)
        assert row["top_mass_per_token"] >= 0.1 and row["zero_fraction"] < 0.01
    # ReLU in place of SiLU zeroes exactly what the gate makes negative
    for layer in tiny.model.layers:
        layer.mlp.act_fn = torch.nn.ReLU()
    relu = activation_stats(tiny, random_ids(4, 16), top=0.1)
    for row in relu["layers"]:
        assert row["zero_fraction"] == pytest.approx(row["gate_negative_fraction"])
        assert row["zero_fraction"] > 0.3


def test_activation_stats_needs_two_windows(tiny):
    with pytest.raises(KernelError, match="n >= 2"):
        activation_stats(tiny, torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(KernelError, match="fraction"):
        summarize(torch.ones(2, 4), top=1.5)


@pytest.mark.integration
def test_smollm2_activations_are_dense_but_concentrated(default_model):
    from edgellm.data import get_calibration

    model, tok = default_model
    windows = get_calibration("pydoc", 2, 32, 0, tokenizer=tok)
    stats = activation_stats(model, windows)
    assert stats["hidden_act"] == "silu" and len(stats["layers"]) == model.config.num_hidden_layers
    assert stats["mean"]["zero_fraction"] < 0.01
    assert stats["mean"]["top_mass_per_token"] > 0.1


# --------------------------------------------------------------------------------------------
# compiled: our C++ extension, torch.compile, llama.cpp's harness


@pytest.fixture(scope="module")
def ext():
    from edgellm.kernels.cpp import KernelUnavailable, extension

    try:
        return extension()
    except KernelUnavailable as e:
        pytest.skip(f"the C++ extension cannot be built here: {e}")


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", TINY_SHAPES + [(300, 576)])
def test_cpp_variants_equal_the_dense_product(ext, shape, threads):
    from edgellm.kernels.cpp import avx2_available, cpp_scalar, cpp_simd

    W, x = weights(*shape)
    codes, scales = q4.quantize_q4_0(W)
    ref = q4.dense_reference(codes, scales, x)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        close(cpp_scalar(q4.pack_rows(codes), scales, x, ext=ext), ref)
        inter = q4.pack_interleaved(codes)
        close(cpp_simd(inter, scales, x, simd=False, ext=ext), ref)          # portable loops
        if avx2_available(ext):
            close(cpp_simd(inter, scales, x, simd=True, ext=ext), ref)
        close(cpp_simd(inter, scales, x, ext=ext), ref)                      # detected path
    finally:
        torch.set_num_threads(old)


@needs_cpp
def test_cpp_checks_its_inputs_and_fuses_silu_mul(ext):
    from edgellm.kernels.cpp import avx2_available, cpp_scalar, silu_mul

    with pytest.raises(RuntimeError, match="float16"):
        cpp_scalar(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 1), torch.zeros(32),
                   ext=ext)
    g, u = 4 * torch.randn(3, 1541), torch.randn(3, 1541)      # a tail the 8-wide loop leaves
    g[0, :6] = torch.tensor([-200.0, -87.5, -20.0, 0.0, 30.0, 200.0])  # the clamps of exp
    ref = silu_mul_separate(g, u)
    paths = [False] + ([True] if avx2_available(ext) else [])
    for simd in paths:
        got = silu_mul(g, u, simd=simd, ext=ext)
        assert torch.isfinite(got).all()
        assert ((got - ref).abs() <= 1e-6 * ref.abs() + 1e-6).all(), simd
    rows, skipped = silu_mul_rows(intermediate=64, calls=2, repeats=1, ext=ext, compile=False)
    names = ["silu_mul_separate", "silu_mul_fused_cpp", "silu_mul_fused_avx2"]
    assert [r["name"] for r in rows] + list(skipped) == names
    assert all(r["max_abs_err"] < 1e-5 for r in rows)


@needs_cpp
def test_a_broken_source_is_reported_and_the_torch_variants_still_run():
    from edgellm.kernels.cpp import KernelUnavailable, extension

    with pytest.raises(KernelUnavailable, match="building the C\\+\\+ kernels failed: .*error"):
        extension(BROKEN)
    rec = bench(shapes=[(32, 64)], variants=("torch_packed", "cpp_scalar", "cpp_simd"),
                footprint_mib=0.1, bound_mib=4, repeats=1, cpp_source=BROKEN)
    assert set(rec["skipped"]) == {"cpp_scalar", "cpp_simd"}
    assert "error" in rec["skipped"]["cpp_simd"]
    assert [r["name"] for r in rec["variants"]] == ["torch_packed"]


@needs_cpp
def test_bench_with_the_cpp_variants_accounts_bytes_within_the_bound(ext):
    rec = bench(shapes=[(64, 64)], variants=("torch_packed", "cpp_scalar", "cpp_simd"),
                footprint_mib=0.25, bound_mib=4, repeats=2)
    assert rec["skipped"] == {}
    for r in rec["variants"]:
        assert 0 < r["fraction_of_bound"] <= 1.05, r
        assert r["rel_err"] <= 1e-4
    assert rec["variants"][-1]["path"] in ("avx2", "scalar")


@needs_cpp
def test_torch_compile_runs_or_says_why():
    rows, skipped = silu_mul_rows(intermediate=64, calls=2, repeats=1, ext=None, compile=True)
    if skipped:
        assert "torch.compile failed" in skipped["silu_mul_compiled"]
    else:
        assert rows[-1]["name"] == "silu_mul_compiled" and rows[-1]["max_abs_err"] < 1e-5


@pytest.mark.llamacpp
@pytest.mark.tools
def test_llamacpp_harness_makes_our_blocks_and_our_product():
    from conftest import skip_missing_system_part

    from edgellm.kernels.cpp import KernelUnavailable
    from edgellm.kernels.ggml_harness import build_harness, run_harness

    try:
        exe = build_harness()
    except KernelUnavailable as e:
        skip_missing_system_part(str(e), "llama.cpp tools")
    W, x = weights(48, 128)
    W *= 0.02
    res = run_harness(W, x, threads=1, copies=3, repeats=2, exe=exe)
    codes, scales = q4.quantize_q4_0(W)
    ours = q4.q4_0_blocks(q4.pack_interleaved(codes), scales)
    assert (res["blocks"] == ours).float().mean() > 0.999               # llama.cpp's Q4_0 = ours
    ref = q4.dense_reference(codes, scales, x)
    assert (res["y"] - ref).abs().max() < 2e-2 * ref.abs().max()        # x went through Q8_0
    assert 0 < res["seconds"] <= res["seconds_median"]
