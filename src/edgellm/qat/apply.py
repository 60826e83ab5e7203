"""The entry point behind ``edgellm qat``: train a model through its quantizer and compare it
with post-training quantization (PTQ) at the same bits, on the same held-out tokens.

One run, on the same data, measures four models against the fp32 model they come from:

``ppl_base``     the fp32 model
``ppl_ptq``      PTQ of the fp32 model (``ptq_method``, lesson 03's best at 2–3 bits: imatrix;
                 ternary: absmean rounding of the weights; 4 bits: llama.cpp's own Q4_0)
``ppl``          QAT: the same weights fine-tuned ``steps`` steps through the fake quantizer,
                 then rounded onto the grid
``ppl_control``  (``control=True``) the fp32 model fine-tuned the same steps on the same windows
                 without the quantizer, then the same PTQ: what fine-tuning alone buys

Bits and grids: 2 and 3 → lesson 03's asymmetric min-max grid at ``group_size`` (or LSQ's learned
symmetric steps with ``lsq=True``); 4 → llama.cpp's Q4_0 (symmetric, groups of 32, fp16 scale),
so the result exports bit for bit; 1.58 → BitNet b1.58 (absmean ternary per tensor, 8-bit
per-token activations; ``group_size`` ignored).  The embedding (tied lm_head) stays fp32 and is
counted at fp16 in ``size_bytes``.
"""

from __future__ import annotations

import copy
import time

import torch

from edgellm.models import DEFAULT_MODEL
from edgellm.qat.fake import QATError

BITS = (1.58, 2, 3, 4)
PTQ_METHODS = ("rtn", "gptq", "awq", "imatrix")
LOSSES = ("ce", "fkl")
INITS = ("ptq", "fp32")


def parse_bits(bits) -> float | int:
    """``1.58``, 2, 3 or 4 (a float 2.0 → 2), else :class:`QATError`."""
    try:
        b = float(bits)
    except (TypeError, ValueError):
        b = None
    if b not in BITS:
        raise QATError(f"--bits {bits}: QAT supports {', '.join(map(str, BITS))} "
                       "(1.58 = BitNet b1.58 ternary; 4 = llama.cpp's Q4_0 grid)")
    return 1.58 if b == 1.58 else int(b)


def grid_of(bits) -> str:
    return {1.58: "ternary", 4: "q4_0"}.get(bits, "minmax")


def check_options(*, bits, group_size: int | None = 64, steps: int = 100, ramp: int = 0,
                  lsq: bool = False, ptq_method: str = "imatrix", loss: str = "ce",
                  curve_every: int = 0, init: str = "ptq") -> float | int:
    """Reject bad settings before any model is loaded; returns the parsed bits."""
    bits = parse_bits(bits)
    if bits == 4 and group_size not in (32, None):
        raise QATError(f"--bits 4 trains on llama.cpp's Q4_0 grid, groups of 32: drop "
                       f"--group-size {group_size} or give 32")
    if bits in (2, 3) and group_size is None:
        raise QATError("--bits 2/3 need a --group-size (e.g. 64, lesson 03's setting)")
    if lsq and bits not in (2, 3):
        raise QATError("--lsq learns the steps of the 2- and 3-bit grids; Q4_0 and ternary fix "
                       "theirs")
    if ramp < 0 or ramp > steps:
        raise QATError(f"--ramp {ramp}: give 0 (full quantization from the first step) up to "
                       f"--steps {steps}")
    if ptq_method not in PTQ_METHODS:
        raise QATError(f"--ptq-method {ptq_method!r}: use one of {', '.join(PTQ_METHODS)}")
    if loss not in LOSSES:
        raise QATError(f"--loss {loss!r}: use ce (next-token) or fkl (distill the fp32 model)")
    if init not in INITS:
        raise QATError(f"--init {init!r}: use ptq (start from the PTQ weights) or fp32")
    if curve_every < 0:
        raise QATError(f"--curve-every {curve_every} must be >= 0 (0: no curve)")
    return bits


def ramp_lambda(step: int, ramp: int) -> float:
    """``λ`` at 0-based ``step``: ``(step + 1)/ramp`` up to 1 (``ramp`` 0: 1 from the start)."""
    return 1.0 if ramp <= 0 else min(1.0, (step + 1) / ramp)


def quantized_size(model, qts: dict, bits) -> dict:
    """Bytes of the deployed model: decoder linears in our packing (``bits`` codes + fp16 scale
    and, for min-max, fp16 offset per group; ternary five weights per byte) + every other tensor
    (embedding = lm_head, norms) at fp16."""
    from edgellm.qat.bitnet import ternary_bytes
    from edgellm.quant.size import model_size

    if bits == 1.58:
        rest = model_size(model, {}, rest_dtype=torch.float16)
        lin_params = sum(q.numel for q in qts.values())
        lin = sum(ternary_bytes(q.numel) for q in qts.values())
        lin16 = sum(2 * q.numel for q in qts.values())
        return {"size_bytes": rest["size_bytes"] - lin16 + lin, "size_bytes_linears": lin,
                "size_bytes_embedding": rest["size_bytes_embedding"],
                "bpw": 8 * lin / lin_params}
    s = model_size(model, qts, rest_dtype=torch.float16)
    n = sum(q.numel for q in qts.values())
    return {"size_bytes": s["size_bytes"], "size_bytes_linears": s["size_bytes_linears"],
            "size_bytes_embedding": s["size_bytes_embedding"],
            "bpw": 8 * s["size_bytes_linears"] / n}


def ptq(model, tok, *, bits, group_size: int | None, method: str = "imatrix", calib: str = "pydoc",
        n_samples: int = 8, seq_len: int = 512, seed: int = 0, progress: bool = False) -> dict:
    """Post-training quantization of ``model`` in place at ``bits``; returns ``{name: QTensor}``."""
    if bits in (1.58, 4):
        from edgellm.qat.layers import finalize, prepare

        prepare(model, grid=grid_of(bits), bits=4, group_size=32,
                a_bits=8 if bits == 1.58 else None)
        return finalize(model)
    from edgellm.quant.apply import quantize_model

    res = quantize_model(model, tok, method=method, bits=bits, group_size=group_size, sym=False,
                         calib=calib, n_samples=n_samples, seq_len=seq_len, seed=seed,
                         progress=progress)
    return res.qtensors


def qat_train(model, tokens, *, bits, group_size: int | None = 64, steps: int = 100,
              batch_size: int = 4, seq_len: int = 256, lr: float = 5e-5, ramp: int = 0,
              lsq: bool = False, loss: str = "ce", teacher=None, schedule: str = "cosine",
              curve_every: int = 0, curve_tokens=None, init_from=None, seed: int = 0,
              progress: bool = False) -> dict:
    """Fine-tune ``model`` in place through the fake quantizer of ``bits``, then round it onto the
    grid for good.  Returns ``{"qtensors", "train", "curve"}``; the curve holds the mean NLL on
    ``curve_tokens`` (1-D) every ``curve_every`` steps, at that step's ``λ``.  ``init_from``, a
    PTQ copy of the model, starts the latent weights at its quantized weights (on the grid, so
    QAT starts where PTQ ends) instead of the fp32 weights."""
    from edgellm.models import linear_layers
    from edgellm.qat.layers import finalize, prepare, set_lambda
    from edgellm.train import train

    grid = grid_of(bits)
    if init_from is not None:
        start = linear_layers(init_from)
        with torch.no_grad():
            for name, lin in linear_layers(model).items():
                lin.weight.copy_(start[name].weight)
    prepare(model, grid=grid, bits=bits if bits in (2, 3) else 4,
            group_size=32 if bits == 4 else group_size, a_bits=8 if bits == 1.58 else None,
            lsq=lsq)
    set_lambda(model, ramp_lambda(0, ramp))
    curve = []

    def point(step: int):
        if curve_every and curve_tokens is not None:
            from edgellm.metrics import token_logprobs

            was = model.training
            model.eval()
            with torch.no_grad():
                nll = token_logprobs(model, curve_tokens, "gptq", 512,
                                     progress=False)["nll"].mean().item()
            model.train(was)
            curve.append({"step": step, "tokens": step * batch_size * seq_len,
                          "lam": ramp_lambda(max(step - 1, 0), ramp), "nll": nll})

    point(0)
    counter = {"step": 0}

    def after_step(m):
        counter["step"] += 1
        s = counter["step"]
        set_lambda(m, ramp_lambda(s, ramp))
        if curve_every and s % curve_every == 0:
            point(s)

    loss_fn = None
    if loss == "fkl":
        from edgellm.distill.losses import forward_kl

        def loss_fn(m, batch):
            with torch.no_grad():
                z_t = teacher(input_ids=batch, use_cache=False).logits
            return forward_kl(m(input_ids=batch, use_cache=False).logits, z_t)

    res = train(model, tokens, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                schedule=schedule, loss_fn=loss_fn, after_step=after_step, seed=seed,
                max_grad_norm=1.0, progress=progress, desc=f"QAT {bits}-bit")
    return {"qtensors": finalize(model), "train": res, "curve": curve}


def fp32_copy(model):
    """A copy of ``model`` that trains what QAT trains (every parameter but the embedding and
    the tied lm_head), without a quantizer: the plain step and the control."""
    out = copy.deepcopy(model)
    for name, p in out.named_parameters():
        p.requires_grad_("embed" not in name and "lm_head" not in name)
    return out


def step_times(model, batch: torch.Tensor, *, bits, group_size: int | None = 64,
               repeats: int = 3, lr: float = 5e-5) -> dict:
    """Seconds of one plain fp32 training step and one QAT step on ``batch`` (B, T), each the
    median of ``repeats`` after one untimed step, on copies, in one run; and their ratio."""
    from edgellm.qat.layers import prepare
    from edgellm.train import lm_loss

    def median_step(m) -> float:
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
        m.train()
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            lm_loss(m, batch).backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t0)
        m.eval()
        return sorted(times)[len(times) // 2]

    plain = fp32_copy(model)
    t_plain = median_step(plain)
    del plain
    fq = copy.deepcopy(model)
    prepare(fq, grid=grid_of(bits), bits=bits if bits in (2, 3) else 4,
            group_size=32 if bits == 4 else group_size, a_bits=8 if bits == 1.58 else None)
    t_qat = median_step(fq)
    return {"seconds_plain_step": t_plain, "seconds_qat_step": t_qat,
            "qat_step_ratio": t_qat / t_plain, "time_repeats": repeats}


def qat_record(model_name: str = DEFAULT_MODEL, *, bits=2, group_size: int | None = 64,
               steps: int = 100, batch_size: int = 4, seq_len: int = 256, lr: float = 5e-5,
               ramp: int = 0, lsq: bool = False, loss: str = "ce", ptq_method: str = "imatrix",
               init: str = "ptq", control: bool = False, curve_every: int = 0, curve_tokens: int = 2048,
               time_steps: int = 0, train_data: str = "pydoc", calib: str = "pydoc",
               n_samples: int = 8, calib_seq_len: int = 512, evaluate: bool = False,
               eval_settings=None, out=None, seed: int = 0, progress: bool = False,
               device=None) -> dict:
    """Load ``model_name`` (on ``device``), train it through the quantizer, compare with PTQ: the record
    ``edgellm qat`` prints.  ``out`` saves the QAT model in the format of ``edgellm quantize
    --out`` (2, 3 and 4 bits; 4 bits then exports bit for bit as Q4_0 with ``edgellm export``).
    ``init`` ``ptq`` (2-3 bits) starts QAT from the PTQ model's weights, ``fp32`` from the
    fp32 weights (1.58 and 4 bits always start from fp32).
    """
    from edgellm.data import get_tokens
    from edgellm.measure import peak_rss_bytes, protocol
    from edgellm.metrics import EvalSettings, evaluate_paired
    from edgellm.models import load_model
    from edgellm.records import record

    bits = check_options(bits=bits, group_size=group_size, steps=steps, ramp=ramp, lsq=lsq,
                         ptq_method=ptq_method, loss=loss, curve_every=curve_every, init=init)
    if out is not None and bits == 1.58:
        raise QATError("a ternary model is measured here, not saved: llama.cpp cannot run "
                       "ternary types on 576-wide rows (drop --out)")
    ev = eval_settings or EvalSettings()
    t_start = time.perf_counter()
    base, tok = load_model(model_name, quiet=not progress, device=device)
    grid = grid_of(bits)
    rec = {"model": model_name, "bits": bits, "grid": "lsq" if lsq else grid,
           "group_size": None if bits == 1.58 else (32 if bits == 4 else group_size),
           "a_bits": 8 if bits == 1.58 else None, "steps": steps, "batch_size": batch_size,
           "seq_len": seq_len, "lr": lr, "ramp": ramp, "loss": loss, "train_data": train_data,
           "ptq_method": ptq_method if bits in (2, 3) else
           ("absmean" if bits == 1.58 else "llama.cpp Q4_0"),
           "embedding": "fp32 (counted at fp16), not trained",
           "init": init if bits in (2, 3) and not lsq else "fp32"}
    tokens = get_tokens(train_data, tok, "train")
    val = get_tokens(ev.data, tok, "validation", curve_tokens) if curve_every else None
    pq = copy.deepcopy(base)
    pq_qts = ptq(pq, tok, bits=bits, group_size=group_size, method=ptq_method, calib=calib,
                 n_samples=n_samples, seq_len=calib_seq_len, seed=seed, progress=progress)
    if time_steps:
        from edgellm.train import train_windows

        first = train_windows(tokens, batch_size, seq_len, seed)
        rec.update(step_times(base, first.to(next(base.parameters()).device),
                              bits=bits, group_size=group_size, repeats=time_steps))
    model = copy.deepcopy(base)
    out_train = qat_train(model, tokens, bits=bits, group_size=group_size, steps=steps,
                          batch_size=batch_size, seq_len=seq_len, lr=lr, ramp=ramp, lsq=lsq,
                          loss=loss, teacher=base, curve_every=curve_every, curve_tokens=val,
                          init_from=pq if rec["init"] == "ptq" else None, seed=seed,
                          progress=progress)
    res = out_train["train"]
    rec.update(loss_first=res.losses[0] if res.losses else None,
               loss_last=res.losses[-1] if res.losses else None,
               train_seconds=res.seconds, trainable_params=res.trainable_params,
               train_tokens_per_s=steps * batch_size * seq_len / res.seconds if res.seconds else None,
               curve=out_train["curve"] or None)
    rec["speed_protocol"] = {"train_tokens_per_s": protocol(
        "train", batch=batch_size, seq_len=seq_len, steps=steps, loss=loss)}
    rec.update(quantized_size(model, out_train["qtensors"], bits))
    rec["size_bytes_ptq"] = quantized_size(pq, pq_qts, bits)["size_bytes"]
    rec.update(ppl=None, ppl_ptq=None, ppl_base=None, kl_mean=None)
    if evaluate:
        kw = dict(progress=progress, **ev.kwargs())
        after = evaluate_paired(model, base, tok, **kw)
        rec.update({k: after[k] for k in (
            "ppl", "ppl_base", "nll", "kl_mean", "kl_stderr", "delta_nll", "delta_nll_stderr",
            "top1_agreement", "n_tokens", "protocol", "ctx", "data", "split", "data_sha256",
            "max_tokens", "chunks") if k in after})
        p = evaluate_paired(pq, base, tok, **kw)
        rec.update(ppl_ptq=p["ppl"], kl_mean_ptq=p["kl_mean"], kl_stderr_ptq=p["kl_stderr"],
                   delta_nll_ptq=p["delta_nll"],
                   delta_nll_ptq_stderr=p["delta_nll_stderr"])
        v = evaluate_paired(model, pq, tok, **kw)  # paired: QAT − PTQ on the same tokens
        rec.update(delta_nll_vs_ptq=v["delta_nll"], delta_nll_vs_ptq_stderr=v["delta_nll_stderr"])
        gap = p["delta_nll"]
        rec["ptq_loss_recovered"] = (gap - after["delta_nll"]) / gap if gap > 0 else None
    if control:
        from edgellm.train import train

        ctl = fp32_copy(base)
        train(ctl, tokens, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
              schedule="cosine", max_grad_norm=1.0, seed=seed, progress=progress,
              desc="control (fp32)")
        ptq(ctl, tok, bits=bits, group_size=group_size, method=ptq_method, calib=calib,
            n_samples=n_samples, seq_len=calib_seq_len, seed=seed, progress=progress)
        if evaluate:
            c = evaluate_paired(model, ctl, tok, progress=progress, **ev.kwargs())
            rec.update(ppl_control=c["ppl_base"], delta_nll_vs_control=c["delta_nll"],
                       delta_nll_vs_control_stderr=c["delta_nll_stderr"])
        del ctl
    if out is not None:
        from edgellm.quant.save import save_quantized

        save_quantized(model, out_train["qtensors"], out, tok,
                       meta={"method": "qat", "model": model_name, "bits": bits,
                             "group_size": rec["group_size"],
                             "sym": bits == 4 or lsq})
        rec["out"] = str(out)
    rec["seconds"] = time.perf_counter() - t_start
    rec["peak_rss_bytes"] = peak_rss_bytes()
    return record(rec, seed=seed, model=model_name)
