"""Pruning cores on plain tensors: masks, Wanda scores, SparseGPT, N:M storage, bad input."""

import pytest
import torch

from edgellm.prune import (
    PruneError,
    check_sparsity,
    global_masks,
    input_norms,
    is_nm,
    magnitude_prune,
    nm_mask,
    nm_storage_bytes,
    parse_nm,
    sparsegpt_prune,
    sparsity_of,
    unstructured_mask,
    wanda_prune,
    wanda_scores,
)


def test_unstructured_mask_exact_per_row_and_per_layer():
    torch.manual_seed(0)
    S = torch.randn(16, 40)
    m = unstructured_mask(S, 0.3)  # floor(0.3 * 40) = 12 pruned in every row
    assert m.dtype == torch.bool and m.shape == S.shape
    assert ((~m).sum(1) == 12).all()
    kept_min = S.masked_fill(~m, float("inf")).min(1).values
    pruned_max = S.masked_fill(m, -float("inf")).max(1).values
    assert (pruned_max <= kept_min).all()  # the lowest scores went
    ml = unstructured_mask(S, 0.3, per="layer")
    assert (~ml).sum() == int(0.3 * S.numel())
    assert S[~ml].max() <= S[ml].min()
    assert unstructured_mask(S, 0.0).all()


def test_nm_mask_pattern_and_choice():
    torch.manual_seed(1)
    S = torch.randn(8, 32)
    m = nm_mask(S, 2, 4)
    g = m.view(8, 8, 4)
    assert (g.sum(-1) == 2).all()  # exactly 2 of every 4 kept
    Sg = S.view(8, 8, 4)
    assert (Sg.masked_fill(~g, float("inf")).min(-1).values
            >= Sg.masked_fill(g, -float("inf")).max(-1).values).all()
    m48 = nm_mask(S, 4, 8)
    assert (m48.view(8, 4, 8).sum(-1) == 4).all()
    assert is_nm(S * m, 2, 4) and not is_nm(S, 2, 4)


def test_ties_broken_by_index_deterministically():
    S = torch.ones(3, 8)  # all equal: the lower indices are pruned first
    m = unstructured_mask(S, 0.5)
    assert torch.equal(m, torch.tensor([[False] * 4 + [True] * 4] * 3))
    assert torch.equal(nm_mask(S, 2, 4)[0], torch.tensor([False, False, True, True] * 2))
    S2 = torch.tensor([[1.0, 2.0, 1.0, 2.0, 1.0, 0.5]])
    # lowest 3: 0.5 (index 5), then the 1.0 at indices 0 and 2 (index 4 is kept)
    assert torch.equal(unstructured_mask(S2, 0.5),
                       torch.tensor([[False, True, False, True, True, False]]))
    for _ in range(3):  # same answer every time
        assert torch.equal(unstructured_mask(S2, 0.5), unstructured_mask(S2.clone(), 0.5))


def test_global_masks_exact_count_with_ties():
    scores = {"a": torch.tensor([[1.0, 1.0, 3.0]]), "b": torch.tensor([[1.0, 0.0, 5.0, 1.0]])}
    masks = global_masks(scores, 0.5)  # 7 weights, prune 3: the 0 and the first two 1.0s
    assert torch.equal(masks["a"], torch.tensor([[False, False, True]]))
    assert torch.equal(masks["b"], torch.tensor([[True, False, True, True]]))
    torch.manual_seed(2)
    big = {"x": torch.randn(30, 20), "y": torch.randn(10, 50).mul(3)}
    ms = global_masks(big, 0.4)
    assert sum(int((~m).sum()) for m in ms.values()) == int(0.4 * 1100)
    assert sparsity_of(big["x"] * ms["x"]) != sparsity_of(big["y"] * ms["y"])  # not uniform


def test_wanda_scores_by_hand():
    W = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 0.5, 0.0]])
    X = torch.tensor([[3.0, 0.0, 1.0], [4.0, 1.0, 0.0]])  # (tokens=2, in=3)
    x_norm = input_norms(X)
    assert torch.allclose(x_norm, torch.tensor([5.0, 1.0, 1.0]))  # sqrt(9+16), sqrt(1), sqrt(1)
    expect = torch.tensor([[1 * 5.0, 2 * 1.0, 3 * 1.0], [4 * 5.0, 0.5 * 1.0, 0.0]])
    assert torch.equal(wanda_scores(W, x_norm), expect)
    Wp, m = wanda_prune(W, x_norm, 1 / 3)  # one weight per row: the lowest score
    assert torch.equal(m, torch.tensor([[True, False, True], [True, True, False]]))
    Wm, _ = magnitude_prune(W, 1 / 3)  # magnitude prunes the 1.0 instead (index 0)
    assert Wm[0, 0] == 0 and Wp[0, 0] == 1.0
    with pytest.raises(PruneError, match="x_norm"):
        wanda_scores(W, torch.ones(4))


def _correlated_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) / d ** 0.5
    scale = torch.rand(d, generator=g) * 4 + 0.1  # uneven channel magnitudes (outliers)
    return (torch.randn(n, d, generator=g) @ (torch.eye(d) + A)) * scale


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_and_wanda_on_reconstruction(nm):
    X = _correlated_inputs()
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    H = 2 * X.T @ X / len(X)

    def err(Wp):
        return ((X @ (W - Wp).T) ** 2).mean().item()

    Ws, m = sparsegpt_prune(W, H, 0.5, nm, block_size=32)
    Wm, _ = magnitude_prune(W, 0.5, nm)
    Ww, _ = wanda_prune(W, input_norms(X), 0.5, nm)
    assert sparsity_of(Ws) == pytest.approx(0.5)
    assert torch.equal(Ws == 0, ~m)
    if nm:
        assert is_nm(Ws, *nm)
    assert err(Ws) < err(Ww) < err(Wm)


def test_sparsegpt_zero_sparsity_keeps_weights():
    X = _correlated_inputs(512, 32)
    W = torch.randn(8, 32)
    Ws, m = sparsegpt_prune(W, 2 * X.T @ X / 512, 0.0, block_size=16)
    assert m.all() and torch.allclose(Ws, W, atol=1e-5)


def test_nm_storage_2_4():
    s = nm_storage_bytes((576, 576), 2, 4, value_bits=16)
    assert s["bits_per_weight"] == pytest.approx(9.0)  # (16 + 2) bits per kept weight, half kept
    assert s["dense_bytes"] == 576 * 576 * 2
    assert nm_storage_bytes((8, 8), 4, 8, value_bits=16)["bits_per_weight"] == pytest.approx(9.5)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "half"])
def test_bad_sparsity(bad):
    with pytest.raises(PruneError, match="sparsity"):
        check_sparsity(bad)
    with pytest.raises(PruneError):
        unstructured_mask(torch.randn(4, 8), bad)


def test_bad_nm():
    S = torch.randn(4, 12)
    with pytest.raises(PruneError, match="1 <= N < M"):
        nm_mask(S, 4, 4)
    with pytest.raises(PruneError, match="1 <= N < M"):
        nm_mask(S, 5, 4)
    with pytest.raises(PruneError, match="does not divide in_features=12"):
        nm_mask(S, 4, 8)
    with pytest.raises(PruneError, match="N:M"):
        parse_nm("2-4")
    with pytest.raises(PruneError, match="multiple of M"):
        sparsegpt_prune(torch.randn(4, 16), torch.eye(16), nm=(2, 4), block_size=6)


def test_mask_viewer_and_sweep_points_are_pure_functions():
    from edgellm.lessons.pruning import mask_for, sweep_points

    torch.manual_seed(4)
    W, x_norm = torch.randn(8, 16), torch.rand(16)
    assert torch.equal(mask_for(W, "wanda", 0.5, "unstructured", x_norm),
                       wanda_prune(W, x_norm, 0.5)[1])
    assert is_nm(W * mask_for(W, "magnitude", 0.5, "2:4"), 2, 4)
    with pytest.raises(PruneError, match="x_norm"):
        mask_for(W, "wanda", 0.5)
    recs = [{"method": "wanda", "sparsity": 0.7, "ppl": 40.0, "ppl_base": 9.0},
            {"method": "wanda", "sparsity": 0.5, "ppl": 20.0, "ppl_base": 9.0},
            {"method": "wanda", "nm": "2:4", "sparsity": 0.5, "ppl": 30.0, "ppl_base": 9.0},
            {"method": "wanda", "structured": "layers", "sparsity": 0.0, "ppl": 15.0, "ppl_base": 9.0}]
    pts = sweep_points(recs)
    assert pts == {"wanda": [(0.5, 20.0), (0.7, 40.0)], "wanda 2:4": [(0.5, 30.0)],
                   "dense": [(0.0, 9.0)]}


def test_sparse_storage_accounting_on_a_tiny_model():
    from edgellm import tiny_llama
    from edgellm.models import linear_layers
    from edgellm.prune import apply_magnitude
    from edgellm.prune.accounting import model_bytes, sparse_storage

    m = tiny_llama()
    dense = model_bytes(m)
    apply_magnitude(m, None, nm=(2, 4))
    assert model_bytes(m) == dense  # zeros stored densely cost the same
    s = sparse_storage(m, (2, 4))
    lin_bytes = sum(lin.weight.numel() * 4 for lin in linear_layers(m).values())
    # fp32 values: half the weights kept, each 32 + 2 bits
    assert s["size_bytes_sparse"] == pytest.approx(dense - lin_bytes + lin_bytes / 4 / 2 * 34 / 8,
                                                   abs=1)


# per-layer sensitivity and a spread sparsity (edgellm.prune.sensitivity)


def test_sensitivity_scan_prunes_one_layer_at_a_time_and_per_layer_sparsity_lands(tiny):
    """On the tiny model: the scan leaves the model unchanged and gives one ΔNLL per layer,
    each that of a copy with only that layer pruned by Wanda's masks from the dense inputs;
    apply_wanda with the spread sparsities hits each layer's target at the same total."""
    import copy

    from edgellm.allocation import spread_ratios
    from edgellm.calib import layer_linears
    from edgellm.metrics import token_logprobs
    from edgellm.prune.sensitivity import layer_sensitivity
    from edgellm.prune.wanda import apply_wanda

    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 256, (4, 32), generator=g)
    tokens = torch.randint(0, 256, (256,), generator=g)
    before = copy.deepcopy(tiny.state_dict())
    sens = layer_sensitivity(tiny, calib, tokens, sparsity=0.5, ctx=64)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    n_layers = len(tiny.model.layers)
    assert sorted(sens) == list(range(n_layers)) and len(set(sens.values())) == n_layers
    # layer 0 pruned alone, by apply_wanda restricted to it (layer 0's inputs are dense anyway)
    one = copy.deepcopy(tiny)
    apply_wanda(one, calib, 0.5, layer_sparsity={i: (0.5 if i == 0 else 0.0)
                                                  for i in range(n_layers)}, progress=False)
    base = token_logprobs(tiny, tokens, "gptq", 64, progress=False)["nll"]
    nll = token_logprobs(one, tokens, "gptq", 64, progress=False)["nll"]
    assert float((nll - base).mean()) == pytest.approx(sens[0], rel=1e-5)

    targets = spread_ratios(sens, 0.5, 0.2)
    stats = apply_wanda(tiny, calib, 0.5, layer_sparsity=targets, progress=False)
    for i, s in targets.items():
        lins = layer_linears(tiny, i).values()
        zeros = sum(int((m.weight == 0).sum()) for m in lins) / sum(m.weight.numel() for m in lins)
        assert zeros == pytest.approx(s, abs=0.05)
    assert stats["sparsity"] == pytest.approx(0.5, abs=0.02)
    with pytest.raises(PruneError, match="N:M"):
        apply_wanda(tiny, calib, None, (2, 4), layer_sparsity=targets, progress=False)
