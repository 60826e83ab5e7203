"""Lesson 05 (quantization in practice): the production-library table and block layouts.

Pure functions over the recorded ``edgellm bnb`` / ``edgellm torchao`` records.
"""

from __future__ import annotations

SWEEPS = ("05_bnb", "05_torchao")


def recorded_runs(sweeps=SWEEPS, *, verbose: bool = True) -> list[dict]:
    """The records of lesson 05's sweeps (``results/05_*.json``), in order; a sweep not recorded
    yet adds nothing (and, with ``verbose``, prints why)."""
    from edgellm.results import load_records

    records = []
    for sweep in sweeps:
        try:
            records += load_records(sweep)
        except FileNotFoundError as e:
            if verbose:
                print(e)
    return records


def record_key(rec: dict) -> str:
    """Short label of a recorded run: ``"bnb nf4+dq"``, ``"bnb int8 t=6"``, ``"torchao
    int8_dynamic"``, ``"edgellm int4_asym"``, ``"bnb nf4 fp32-path"``."""
    lib, mode = rec.get("library", "bnb"), rec["mode"]
    key = f"{lib} {mode}" + ("+dq" if rec.get("double_quant") else "")
    if lib == "bnb" and mode == "int8":
        key += f" t={rec.get('threshold', 6.0):g}"
    if lib == "bnb" and mode != "int8" and rec.get("cpu_kernel") is False:
        key += " fp32-path"
    return key


def production_rows(records: list[dict]) -> list[dict]:
    """One row per record: quality (ppl, ΔNLL ± se, KL, top-1), memory (MB, as loaded and at
    run time), speed (``prefill_tokens_per_s`` batched and ``decode_tokens_per_s`` batch-1, each
    with its ratio to fp32 measured in the same run, and the protocol names from the record's
    ``speed_protocol``), load seconds."""
    rows = []
    for r in records:
        tps, base = r.get("prefill_tokens_per_s"), r.get("prefill_tokens_per_s_base")
        protocols = r.get("speed_protocol") or {}
        dec, dec_base = r.get("decode_tokens_per_s"), r.get("decode_tokens_per_s_base")
        rows.append({
            "key": record_key(r), "library": r.get("library"), "mode": r["mode"],
            "ppl": r.get("ppl"), "ppl_base": r.get("ppl_base"), "delta_nll": r.get("delta_nll"),
            "delta_nll_stderr": r.get("delta_nll_stderr"), "kl_mean": r.get("kl_mean"),
            "top1_agreement": r.get("top1_agreement"), "n_tokens": r.get("n_tokens"),
            "memory_mb": r["memory_bytes"] / 1e6,
            "memory_mb_runtime": (r.get("memory_bytes_runtime") or r["memory_bytes"]) / 1e6,
            "memory_mb_base": r["memory_bytes_base"] / 1e6,
            "linears_mb": r.get("memory_bytes_linears", 0) / 1e6,
            "size_mb": r.get("size_bytes", r["memory_bytes"]) / 1e6,
            "prefill_tokens_per_s": tps, "speed_vs_fp32": tps / base if tps and base else None,
            "prefill_protocol": protocols.get("prefill_tokens_per_s", {}).get("name"),
            "decode_tokens_per_s": dec,
            "decode_protocol": protocols.get("decode_tokens_per_s", {}).get("name"),
            "decode_vs_fp32": dec / dec_base if dec and dec_base else None,
            "seconds_load": r.get("seconds_load")})
    return rows


def format_rows(rows: list[dict]) -> str:
    """A fixed-width text table of :func:`production_rows`."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (f"{'run':<26}{'ppl':>8}{'ΔNLL':>9}{'±':>7}{'KL':>8}{'top1':>7}{'MB':>8}"
            f"{'MB run':>8}{'prefill':>8}{'×fp32':>7}{'decode':>8}{'×fp32':>7}{'tokens':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['key']:<26}{f(r['ppl'], '.3f'):>8}{f(r['delta_nll'], '+.4f'):>9}"
            f"{f(r['delta_nll_stderr'], '.4f'):>7}{f(r['kl_mean'], '.4f'):>8}"
            f"{f(r['top1_agreement'], '.3f'):>7}{r['size_mb']:>8.1f}{r['memory_mb_runtime']:>8.1f}"
            f"{f(r['prefill_tokens_per_s'], '.1f'):>8}{f(r['speed_vs_fp32'], '.2f'):>7}"
            f"{f(r['decode_tokens_per_s'], '.1f'):>8}{f(r['decode_vs_fp32'], '.2f'):>7}"
            f"{f(r['n_tokens'], 'd'):>7}")
    return "\n".join(lines)


def block_layout(mode: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                 in_features: int = 576) -> dict:
    """Bytes one block of weights takes in a format, as the libraries store it.

    Returns ``{"weights", "code_bytes", "scale_bytes", "bpw", "text"}`` for one block of
    ``blocksize`` weights (one row of ``in_features`` for the per-row int8 formats).
    """
    if mode in ("int8", "int8_weight_only", "int8_dynamic"):
        n, code, scale = in_features, in_features, 4.0
        what = "int8 codes + 1 fp32 scale per row"
        if mode == "int8_weight_only" or mode == "int8_dynamic":
            scale, what = 5.0, "int8 codes + fp32 scale + int8 zero point (0) per row"
    elif mode == "int4_asym":
        n, code, scale = blocksize, blocksize / 2, 4.0
        what = "4-bit codes, 2 per byte + fp16 scale + fp16 min"
    else:
        n, code = blocksize, blocksize / 2
        scale = 1 + 4 / 256 if double_quant else 4.0
        what = ("4-bit codes, 2 per byte + 1 uint8 absmax code (+ 1 fp32 per 256 blocks)"
                if double_quant else "4-bit codes, 2 per byte + 1 fp32 absmax")
    bpw = 8 * (code + scale) / n
    return {"weights": n, "code_bytes": code, "scale_bytes": scale, "bpw": bpw,
            "text": f"{mode}{'+dq' if double_quant else ''}: {n} weights -> {code:g} B codes + "
                    f"{scale:g} B scale = {code + scale:g} B ({bpw:.3f} bits/weight); {what}"}


def describe(records: list[dict], key: str) -> str:
    """What the lesson's widget prints for one run: its measurements and its block layout."""
    by_key = {record_key(r): r for r in records}
    if key not in by_key:
        return f"no recorded run {key!r}; recorded: {', '.join(by_key)}"
    r = by_key[key]
    row = production_rows([r])[0]
    layout = block_layout(r["mode"], r.get("blocksize") or 64, bool(r.get("double_quant")))
    lines = [f"{key}  ({r.get('library')} {r.get('library_version') or ''})".rstrip()]
    if row["ppl"] is not None:
        lines.append(f"quality : ppl {row['ppl']:.3f} vs fp32 {row['ppl_base']:.3f}, ΔNLL "
                     f"{row['delta_nll']:+.4f} ± {row['delta_nll_stderr']:.4f}, KL "
                     f"{row['kl_mean']:.4f}, top-1 {row['top1_agreement']:.3f} on "
                     f"{row['n_tokens']} tokens")
    lines.append(f"memory  : {row['size_mb']:.1f} MB stored, {row['memory_mb_runtime']:.1f} MB "
                 f"while running, fp32 {row['memory_mb_base']:.1f} MB")
    if row["prefill_tokens_per_s"] is not None:
        lines.append(f"prefill : {row['prefill_tokens_per_s']:.1f} tokens/s = "
                     f"{row['speed_vs_fp32']:.2f} x fp32 (same run, protocol "
                     f"{row['prefill_protocol']}), load {row['seconds_load']:.1f} s")
        if row["decode_tokens_per_s"] is not None:
            lines.append(f"decode  : {row['decode_tokens_per_s']:.1f} tokens/s = "
                         f"{row['decode_vs_fp32']:.2f} x fp32 (batch 1, KV cache, same run, "
                         f"protocol {row['decode_protocol']})")
    else:
        lines.append("speed   : fake-quantized fp32 weights (our code): fp32 speed")
    lines.append(f"layout  : {layout['text']}")
    return "\n".join(lines)


def decode_bytes_table(model, bits_per_weight: float = 4.5) -> list[dict]:
    """Bytes a batch-1 decode step reads, fp32 against ``bits_per_weight`` decoder linears, computed
    from the model's parameters (an Amdahl table).

    Each generated token reads every decoder linear once and the whole tied embedding once more as
    ``lm_head`` (the input lookup reads one row: negligible); norms are counted with the rest.
    The libraries quantize only the decoder linears, so the fp32 ``lm_head`` bounds the gain.

    Returns two rows (``"fp32"``, ``f"{bits} bpw linears"``) with ``linears_bytes``,
    ``lm_head_bytes``, ``other_bytes``, ``bytes_per_token``, ``lm_head_share`` (its fraction of
    the bytes read) and ``bound`` (fp32 bytes / these bytes: the decode speed-up a purely
    memory-bound step could reach); plus, on the quantized row, ``linears_ratio`` (32 / bits).
    """
    from edgellm.models import linear_layers

    lin = sum(m.weight.numel() for m in linear_layers(model).values())
    head = model.get_output_embeddings().weight.numel()
    seen = {id(m.weight) for m in linear_layers(model).values()} | {
        id(model.get_output_embeddings().weight)}
    other = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    other -= model.get_input_embeddings().weight.numel() * (
        id(model.get_input_embeddings().weight) not in seen)  # an untied input table: one row read
    rows = []
    for label, bits in (("fp32", 32.0), (f"{bits_per_weight:g} bpw linears", bits_per_weight)):
        lin_b, head_b, other_b = lin * bits / 8, head * 4.0, other * 4.0
        total = lin_b + head_b + other_b
        rows.append({"format": label, "linears_bytes": lin_b, "lm_head_bytes": head_b,
                     "other_bytes": other_b, "bytes_per_token": total,
                     "lm_head_share": head_b / total})
    for r in rows:
        r["bound"] = rows[0]["bytes_per_token"] / r["bytes_per_token"]
    rows[1]["linears_ratio"] = 32.0 / bits_per_weight
    return rows


def format_decode_bytes(rows: list[dict], measured: float | None = None) -> str:
    """The Amdahl table of :func:`decode_bytes_table` as text; ``measured`` adds the recorded
    decode speed-up to the quantized row."""
    head = (f"{'weights read per token':<24}{'linears MB':>11}{'lm_head MB':>11}{'total MB':>10}"
            f"{'lm_head %':>10}{'bound ×':>9}{'measured ×':>11}")
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows):
        m = "" if measured is None or i == 0 else f"{measured:.2f}"
        lines.append(f"{r['format']:<24}{r['linears_bytes'] / 1e6:>11.1f}"
                     f"{r['lm_head_bytes'] / 1e6:>11.1f}{r['bytes_per_token'] / 1e6:>10.1f}"
                     f"{100 * r['lm_head_share']:>10.0f}{r['bound']:>9.2f}{m:>11}")
    return "\n".join(lines)
