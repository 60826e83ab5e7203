"""GPTQ and SparseGPT against line-by-line transcriptions of the papers' reference loops.

GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (2022), the reference ``GPTQ.fasterquant``.
SparseGPT: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot" (2023), the reference ``SparseGPT.fasterprune``.

The transcriptions keep the reference names (``W``, ``H``, ``Hinv``, ``W1``, ``Q1``, ``Err1``,
``Hinv1``, ``err1``) and order of operations, in plain torch.  Where the reference and
``edgellm`` deliberately differ, the transcription takes ours and says so in a comment:

* the quantization grid (``find_params``/``quantize``): ours is min/max with an fp16 offset
  (``edgellm.quant.rtn``), the reference's a rounded integer zero point with 0 always in range.
  The loop is what is under test, so the transcription uses our grid;
* the unstructured mask: the reference prunes ``tmp <= sorted(tmp)[k]`` (k + 1 weights), ours
  exactly ``k = int(sparsity · numel)`` per block, so the transcription thresholds at ``[k - 1]``.

The mutation tests re-execute OUR function with an off-by-one in the lazy block update and
show that the comparison then fails: these tests can fail.
"""

import __future__

import inspect

import pytest
import torch

from edgellm.prune import sparsegpt as sparsegpt_module
from edgellm.prune.sparsegpt import sparsegpt_prune
from edgellm.quant import gptq as gptq_module
from edgellm.quant.gptq import gptq_quantize

DAMP = 0.01  # percdamp of both references, and our default


def toy_layer(n_out=24, n_in=64, n_tokens=512, seed=0):
    """``W`` (n_out, n_in) and ``H = 2 XᵀX / n`` (n_in, n_in) of correlated, unevenly scaled
    inputs (so the OBS updates are far from zero)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n_out, n_in, generator=g)
    mix = torch.randn(n_in, n_in, generator=g) / n_in ** 0.5 + torch.eye(n_in)
    X = torch.randn(n_tokens, n_in, generator=g) @ mix * torch.linspace(0.2, 3.0, n_in)  # (n, in)
    H = 2 * X.T @ X / n_tokens  # (in, in)
    return W, H


def reference_hinv(H, percdamp=DAMP):
    """The reference preamble: damping, then the upper Cholesky factor of H⁻¹."""
    H = H.clone()
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0])
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    return H


# --------------------------------------------------------------------------------------------
# GPTQ


def find_params(x, bits, sym):
    """Our grid (edgellm.quant.rtn.minmax_params, fp16 scale and offset) over the rows of x."""
    if sym:
        scale = (x.abs().amax(dim=1) / (2 ** (bits - 1) - 1)).half().float()  # (out,)
        return scale, torch.zeros_like(scale)
    xmin, xmax = x.amin(dim=1), x.amax(dim=1)
    return ((xmax - xmin) / (2 ** bits - 1)).half().float(), xmin.half().float()


def quantize(x, scale, offset, bits, sym):
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
    return torch.clamp(torch.round((x - offset) / torch.where(scale == 0, 1.0, scale)),
                       lo, hi) * scale + offset


def reference_fasterquant(W, H, bits, sym, blocksize, groupsize=-1, percdamp=DAMP):
    """GPTQ.fasterquant, transcribed (no act_order, no static groups)."""
    W = W.clone().float()
    H = H.clone()
    if groupsize == -1:  # per channel: parameters from the whole W, before the loop
        scale, zero = find_params(W, bits, sym)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    Q = torch.zeros_like(W)
    Hinv = reference_hinv(H, percdamp)
    columns = W.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if groupsize != -1:
                if (i1 + i) % groupsize == 0:
                    scale, zero = find_params(W[:, (i1 + i):(i1 + i + groupsize)], bits, sym)

            q = quantize(w, scale, zero, bits, sym)
            Q1[:, i] = q

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q


GPTQ_CASES = [  # (bits, sym, group_size, block_size): group size = block size, or per channel
    (4, False, 16, 16),
    (3, True, 16, 16),
    (2, False, 32, 32),
    (4, False, None, 16),
]


@pytest.mark.parametrize("bits,sym,group_size,block_size", GPTQ_CASES)
def test_gptq_equals_the_reference_loop(bits, sym, group_size, block_size):
    W, H = toy_layer()
    Q_ref = reference_fasterquant(W, H, bits, sym, block_size,
                                  -1 if group_size is None else group_size)
    Q, qt = gptq_quantize(W, H, bits, group_size, sym, damp=DAMP, block_size=block_size)
    torch.testing.assert_close(Q, Q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(qt.dequantize(), Q, rtol=0, atol=1e-6)
    assert (Q - W).abs().max() > 1e-2  # the toy is not trivially representable


# --------------------------------------------------------------------------------------------
# SparseGPT


def reference_fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=DAMP):
    """SparseGPT.fasterprune, transcribed (no quantizer).  ``prunen`` is the number of weights
    PRUNED in each group of ``prunem`` (the reference's convention; ours keeps ``n`` of ``m``)."""
    W = W.clone().float()
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    Hinv = reference_hinv(H, percdamp)
    columns = W.shape[1]
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            # reference: [int(numel * sparsity)] with <=, which prunes k + 1; ours prunes k
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity) - 1]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)

            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, mask


# weights of order 1 updated through a blocked and a column-by-column loop in float32: the two
# orders of summation differ by about 1e-6 (CPU-dependent); an off-by-one differs by far more
SPARSEGPT_ATOL = 1e-5
SPARSEGPT_CASES = [  # (sparsity, nm, block_size)
    (0.5, None, 16),
    (0.7, None, 32),
    (None, (2, 4), 16),
    (None, (1, 4), 32),
]


def _reference_prune(W, H, sparsity, nm, block_size):
    if nm is None:
        return reference_fasterprune(W, H, sparsity, blocksize=block_size)
    n, m = nm
    return reference_fasterprune(W, H, 0, prunen=m - n, prunem=m, blocksize=block_size)


@pytest.mark.parametrize("sparsity,nm,block_size", SPARSEGPT_CASES)
def test_sparsegpt_equals_the_reference_loop(sparsity, nm, block_size):
    W, H = toy_layer(seed=1)
    W_ref, pruned_ref = _reference_prune(W, H, sparsity, nm, block_size)
    Wp, keep = sparsegpt_prune(W, H, 0.5 if sparsity is None else sparsity, nm,
                               block_size=block_size, damp=DAMP)
    assert torch.equal(keep, ~pruned_ref)
    torch.testing.assert_close(Wp, W_ref, rtol=0, atol=SPARSEGPT_ATOL)
    assert (Wp[keep] - W[keep]).abs().max() > 1e-2  # the kept weights were really updated


# --------------------------------------------------------------------------------------------
# the comparisons can fail: an off-by-one in OUR lazy block update is caught

LAZY_UPDATE = "W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]"
MUTATIONS = {
    "skips the first column after the block": "W[:, i2 + 1:] -= Err1 @ Hinv[i1:i2, i2 + 1:]",
    "drops the block's last error column": "W[:, i2:] -= Err1[:, :-1] @ Hinv[i1:i2 - 1, i2:]",
    "also updates the block's last column": "W[:, i2 - 1:] -= Err1 @ Hinv[i1:i2, i2 - 1:]",
}


def mutated(module, public: str, old: str, new: str):
    """``module.<public>`` re-executed from its source with ``old`` replaced by ``new`` in the
    one function of the module that contains ``old`` (the public function itself or a helper
    it calls, both re-executed in a copy of the module's namespace)."""
    flags = __future__.annotations.compiler_flag  # as the modules are compiled
    namespace = dict(vars(module))
    functions = [f for f in vars(module).values()
                 if inspect.isfunction(f) and f.__module__ == module.__name__]
    hits = [f for f in functions if old in inspect.getsource(f)]
    assert len(hits) == 1, f"{old!r} found in {len(hits)} functions of {module.__name__}"
    source = inspect.getsource(hits[0])
    assert source.count(old) == 1
    exec(compile(source.replace(old, new), f"<mutated {hits[0].__name__}>", "exec", flags=flags,
                 dont_inherit=True), namespace)
    if hits[0].__name__ != public:  # the public function must call the mutated helper
        exec(compile(inspect.getsource(getattr(module, public)), f"<{public}>", "exec",
                     flags=flags, dont_inherit=True), namespace)
    return namespace[public]


@pytest.mark.parametrize("mutation", list(MUTATIONS)[:2])
def test_an_off_by_one_in_the_gptq_lazy_update_is_caught(mutation):
    W, H = toy_layer()
    bits, sym, group_size, block_size = GPTQ_CASES[0]
    Q_ref = reference_fasterquant(W, H, bits, sym, block_size, group_size)
    bad = mutated(gptq_module, "gptq_quantize", LAZY_UPDATE, MUTATIONS[mutation])
    Q_bad, _ = bad(W, H, bits, group_size, sym, damp=DAMP, block_size=block_size)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(Q_bad, Q_ref, rtol=0, atol=1e-6)
    # and the unmutated copy still agrees (the re-execution itself changes nothing)
    same = mutated(gptq_module, "gptq_quantize", LAZY_UPDATE, LAZY_UPDATE)
    torch.testing.assert_close(same(W, H, bits, group_size, sym, damp=DAMP,
                                    block_size=block_size)[0], Q_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("sparsity,nm,block_size", [SPARSEGPT_CASES[0], SPARSEGPT_CASES[2]])
def test_an_off_by_one_in_the_sparsegpt_lazy_update_is_caught(mutation, sparsity, nm, block_size):
    W, H = toy_layer(seed=1)
    W_ref, _ = _reference_prune(W, H, sparsity, nm, block_size)
    s = 0.5 if sparsity is None else sparsity
    bad = mutated(sparsegpt_module, "sparsegpt_prune", LAZY_UPDATE, MUTATIONS[mutation])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(bad(W, H, s, nm, block_size=block_size, damp=DAMP)[0], W_ref,
                                   rtol=0, atol=SPARSEGPT_ATOL)
    same = mutated(sparsegpt_module, "sparsegpt_prune", LAZY_UPDATE, LAZY_UPDATE)
    torch.testing.assert_close(same(W, H, s, nm, block_size=block_size, damp=DAMP)[0], W_ref,
                               rtol=0, atol=SPARSEGPT_ATOL)
