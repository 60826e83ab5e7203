"""Lesson 11's tables, figures and widget: llama.cpp's types, our quantizers in llama.cpp, the
runtimes and the roofline, read from the recorded sweeps (``results/11_*.json``)."""

from __future__ import annotations

import math

import numpy as np

RESOLVED = 2.0  # a difference counts when it is more than this many standard errors


def verdict(diff: float, se: float) -> str:
    """"lower" / "higher" when ``diff`` is more than two standard errors from 0, else "not
    resolved"."""
    if se > 0 and abs(diff) > RESOLVED * se:
        return "higher" if diff > 0 else "lower"
    return "not resolved"


def q4_0_block(x: np.ndarray) -> tuple[float, np.ndarray]:
    """One Q4_0 block by llama.cpp's rule: ``d = (signed max) / −8``, ``q = trunc(x/d + 8.5)``
    clipped to 15 (``d`` rounded to fp16); returns ``(d, codes)``."""
    x = np.asarray(x, dtype=np.float32)
    m = x[np.argmax(np.abs(x))]
    d = np.float32(m / -8)
    inv = np.float32(1 / d) if d else np.float32(0)
    q = np.minimum(15, np.trunc(x * inv + np.float32(8.5))).astype(np.uint8)
    return float(np.float16(d)), q


def pack_q4_0(d: float, q: np.ndarray) -> bytes:
    """The 18 bytes of a Q4_0 block: the fp16 scale, then codes ``j`` and ``j + 16`` in the low
    and high nibble of byte ``j``."""
    q = np.asarray(q, dtype=np.uint8)
    return np.float16(d).tobytes() + (q[:16] | (q[16:] << 4)).astype(np.uint8).tobytes()


def type_label(rec: dict) -> str:
    label = rec["type"]
    if rec.get("imatrix"):
        label += "+imatrix"
    if rec.get("token_embedding_type") is None and rec["type"] not in ("F32", "F16", "Q8_0"):
        label += " (llama.cpp's embedding)"
    return label


def type_rows(records: list[dict], model: str | None = None) -> list[dict]:
    """One row per llama.cpp file of ``results/11_types`` (optionally one model's)."""
    rows = []
    for r in records:
        if model and r["model"] != model:
            continue
        rows.append({"label": type_label(r), "type": r["type"], "imatrix": bool(r.get("imatrix")),
                     "model": r["model"], "bpw": r["bpw"], "size_bytes": r["size_bytes"],
                     "type_counts": r.get("type_counts", {}), "ppl": r["ppl"],
                     "ppl_base": r["ppl_base"], "delta_nll": r["delta_nll"],
                     "se": r["delta_nll_stderr"], "kl_mean": r["kl_mean"],
                     "top1": r["top1_agreement"], "n_tokens": r["n_tokens"],
                     "default_embedding": r.get("token_embedding_type") is None
                     and r["type"] not in ("F32", "F16", "Q8_0")})
    return rows


def ours_rows(records: list[dict], model: str | None = None) -> list[dict]:
    """One row per file of ``results/11_ours``: our quantizer's codes in llama.cpp's blocks."""
    rows = []
    for r in records:
        if model and r["model"] != model:
            continue
        g = r["gguf"]
        kind = "sym" if r.get("sym") else "asym"
        rows.append({"label": f"ours: {r['method']} W{r['bits']}g32 {kind} → {g['type']}",
                     "method": r["method"], "type": g["type"], "model": r["model"],
                     "bpw": g["bpw"], "size_bytes": g["size_bytes"], "ppl": g["ppl"],
                     "ppl_base": g["ppl_base"], "delta_nll": g["delta_nll"],
                     "se": g["delta_nll_stderr"], "kl_mean": g["kl_mean"],
                     "top1": g["top1_agreement"], "ppl_simulated": g["ppl_simulated"],
                     "vs_sim": g["delta_nll_vs_simulated"],
                     "vs_sim_se": g["delta_nll_stderr_vs_simulated"],
                     "kl_vs_sim": g["kl_mean_vs_simulated"],
                     "top1_vs_sim": g["top1_agreement_vs_simulated"]})
    return rows


def format_counts(counts: dict) -> str:
    return " ".join(f"{t}×{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def format_type_table(rows: list[dict]) -> str:
    head = (f"{'file':<34}{'bpw':>6}{'MiB':>7}{'ΔNLL ± se':>18}{'KL':>8}{'top-1':>7}"
            f"  linears' types")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: -r["bpw"]):
        lines.append(f"{r['label']:<34}{r['bpw']:>6.2f}{r['size_bytes'] / 2**20:>7.1f}"
                     f"{r['delta_nll']:>+10.4f} ± {r['se']:.4f}{r['kl_mean']:>8.4f}"
                     f"{r['top1']:>7.1%}  {format_counts(r.get('type_counts', {}))}")
    return "\n".join(lines)


def format_ours_table(rows: list[dict]) -> str:
    head = (f"{'file':<36}{'bpw':>6}{'PPL sim':>9}{'PPL llama.cpp':>14}"
            f"{'llama.cpp − sim (ΔNLL)':>26}{'vs fp32 ΔNLL ± se':>21}")
    lines = [head, "-" * len(head)]
    for r in rows:
        rel = r["ppl"] / r["ppl_simulated"] - 1
        lines.append(f"{r['label']:<36}{r['bpw']:>6.2f}{r['ppl_simulated']:>9.4f}"
                     f"{r['ppl']:>10.4f} ({rel:+.2%})"
                     f"{r['vs_sim']:>+12.5f} ± {r['vs_sim_se']:.5f}"
                     f"{r['delta_nll']:>+11.4f} ± {r['se']:.4f}")
    return "\n".join(lines)


def compare(a: dict, b: dict) -> str:
    """``a`` against ``b`` (two files evaluated against the same reference on the same tokens):
    the difference of their ΔNLL, with the standard errors added in quadrature (each ΔNLL is
    paired with the reference; the two files are not paired with each other here)."""
    diff = a["delta_nll"] - b["delta_nll"]
    se = math.hypot(a["se"], b["se"])
    return (f"{a['label']} − {b['label']}: ΔNLL {diff:+.4f} ± {se:.4f} at "
            f"{a['bpw']:.2f} vs {b['bpw']:.2f} bpw → {verdict(diff, se)}")


def plot_loss_vs_bpw(types: list[dict], ours: list[dict] | None = None, *, title: str = ""):
    """ΔNLL = ln(PPL/PPL_F32) (log scale: ln(PPL/PPL_F32 − 1) ≈ ln ΔNLL when small) and KL
    against bits per weight: llama.cpp's types without and with an importance matrix, and our
    quantizers' files.  Points within two standard errors of 0 sit on the floor, hollow."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    floor = 1e-4
    groups = [("llama.cpp", [r for r in types if not r["imatrix"] and not r["default_embedding"]
                             and r["type"] != "F32"], "o", "C0"),
              ("llama.cpp + imatrix", [r for r in types if r["imatrix"]], "^", "C1"),
              ("ours (GGUF blocks)", ours or [], "*", "C3")]
    for name, rows, marker, color in groups:
        if not rows:
            continue
        rows = sorted(rows, key=lambda r: r["bpw"])
        x = [r["bpw"] for r in rows]
        y = [max(r["delta_nll"], floor) for r in rows]
        solid = [abs(r["delta_nll"]) > RESOLVED * r["se"] for r in rows]
        for xi, yi, s in zip(x, y, solid, strict=True):
            axes[0].scatter(xi, yi, marker=marker, s=60, color=color,
                            facecolors=color if s else "none")
        axes[0].plot([], [], marker, color=color, label=name)
        axes[1].scatter(x, [max(r["kl_mean"], floor) for r in rows], marker=marker, s=60,
                        color=color, label=name)
        if name != "ours (GGUF blocks)":
            for r in rows:
                axes[1].annotate(r["type"], (r["bpw"], max(r["kl_mean"], floor)), fontsize=7,
                                 xytext=(3, 3), textcoords="offset points")
    axes[0].set_ylabel("ΔNLL vs fp32 (nats/token)")
    axes[1].set_ylabel("KL(fp32 ‖ file), nats/token")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight of the decoder's tensors (from the file)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def gguf_summary(path) -> dict:
    """What a GGUF file says about itself: a few metadata fields, its tensors' types (counted)
    and shapes, and its size."""
    from collections import Counter
    from pathlib import Path

    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key):
        f = reader.get_field(key)
        if f is None:
            return None
        v = f.parts[f.data[0]]
        return bytes(v).decode() if v.dtype == np.uint8 else v.tolist()[0]

    arch = field("general.architecture")
    meta = {k: field(k) for k in ("general.architecture", "general.name", "general.file_type",
                                  f"{arch}.context_length", f"{arch}.embedding_length",
                                  f"{arch}.block_count", f"{arch}.attention.head_count",
                                  f"{arch}.attention.head_count_kv", "tokenizer.ggml.model")}
    tensors = [(t.name, t.tensor_type.name, [int(x) for x in t.shape], int(t.n_bytes))
               for t in reader.tensors]
    return {"metadata": meta, "n_fields": len(reader.fields), "tensors": tensors,
            "type_counts": dict(Counter(t[1] for t in tensors)),
            "size_bytes": Path(path).stat().st_size}


RUNTIME_NAMES = {"torch": "torch eager fp32", "bnb": "bitsandbytes NF4",
                 "torchao": "torchao int8 (w)", "onnxruntime": "ONNX Runtime",
                 "executorch": "ExecuTorch"}


def runtime_name(rec: dict) -> str:
    """``torch eager fp32``, ``llama.cpp Q4_0``, ``ONNX Runtime int8``, ``ExecuTorch 8da4w`` …
    (the file's type is the last part of its name: ``rt-<type>.<ext>``)."""
    if rec["runtime"] in ("torch", "bnb", "torchao"):
        return RUNTIME_NAMES[rec["runtime"]]
    stem = rec["model"].rsplit("/", 1)[-1].split(".", 1)[0].removeprefix("rt-")
    return f"{RUNTIME_NAMES.get(rec['runtime'], 'llama.cpp')} {stem}"


def runtime_quality(runtimes: list[dict], types: list[dict] = (), ours: list[dict] = ()) -> dict:
    """``{runtime name: {ppl, delta_nll, se, kl_mean, top1}}`` on the same 8,192 pydoc test
    tokens against PyTorch fp32: the ONNX / ExecuTorch exports evaluated by their runtime
    (``edgellm export --eval`` records of ``results/11_runtimes``), llama.cpp's types from
    :func:`type_rows` of ``results/11_types`` (token embedding Q8_0, no importance matrix) and
    our GPTQ file from :func:`ours_rows` of ``results/11_ours``; PyTorch fp32 is the
    reference itself."""
    out = {"torch eager fp32": {"ppl": None, "delta_nll": 0.0, "se": 0.0, "kl_mean": 0.0,
                                "top1": 1.0}}

    keys = ("ppl", "delta_nll", "se", "kl_mean", "top1")
    for r in runtimes:
        if r.get("format") in ("onnx", "executorch") and "delta_nll" in r:
            out[runtime_name({"runtime": r["runtime"], "model": r["out"]})] = {
                "ppl": r["ppl"], "delta_nll": r["delta_nll"], "se": r["delta_nll_stderr"],
                "kl_mean": r["kl_mean"], "top1": r["top1_agreement"]}
    for r in types:                                      # rows of type_rows
        if r["model"] == "smollm2-135m" and not r["imatrix"] and not r["default_embedding"]:
            out[f"llama.cpp {r['type']}"] = {k: r[k] for k in keys}
    for r in ours:                                       # rows of ours_rows
        if r["model"] == "smollm2-135m" and r["method"] == "gptq" and r["type"] == "Q4_0":
            out["llama.cpp gptq-Q4_0"] = {k: r[k] for k in keys}
    return out


def runtime_rows(records: list[dict]) -> list[dict]:
    """One row per ``edgellm bench-runtime`` record of ``results/11_runtimes`` (llama-bench's
    figures as rows of their own)."""
    rows = []
    for r in records:
        if r.get("protocol") != "runtime":
            continue
        name = runtime_name(r)
        base = {"threads": r["threads"], "size_bytes": r["size_bytes"],
                "bytes_per_token": r["bytes_per_token"], "bound": r["decode_bound_tokens_per_s"],
                "prefill_bound": r.get("prefill_bound_tokens_per_s"),
                "peak_rss_bytes": r["peak_rss_bytes"], "load_s": r["load_s"],
                "ttft_s": r["ttft_s"], "generated_ids": r.get("generated_ids"),
                "runtime": r["runtime"]}
        rows.append({**base, "name": name, "prefill": r["prefill_tokens_per_s"],
                     "decode": r["decode_tokens_per_s"], "fraction": r["fraction_of_bound"]})
        if r.get("llama_bench"):
            lb = r["llama_bench"]
            rows.append({**base, "name": name.replace("llama.cpp", "llama-bench"),
                         "prefill": lb["prefill_tokens_per_s"], "decode": lb["decode_tokens_per_s"],
                         "fraction": lb["fraction_of_bound"], "load_s": None, "ttft_s": None,
                         "peak_rss_bytes": None, "generated_ids": None})
    return rows


def format_quality_table(quality: dict, names: list[str]) -> str:
    """ΔNLL ± SE, KL and top-1 of each runtime's file against PyTorch fp32 (same tokens)."""
    head = f"{'runtime / file':<26}{'ΔNLL ± SE':>20}{'KL':>9}{'top-1':>8}  vs fp32 (2 SE)"
    lines = [head, "-" * len(head)]
    for n in names:
        q = quality.get(n.replace("llama-bench", "llama.cpp"))
        if q is None:
            lines.append(f"{n:<26}{'not measured on these tokens':>37}")
            continue
        v = "reference" if n.startswith("torch") else verdict(q["delta_nll"], q["se"])
        lines.append(f"{n:<26}{q['delta_nll']:>+11.4f} ± {q['se']:<6.4f}{q['kl_mean']:>9.4f}"
                     f"{q['top1']:>8.1%}  {v}")
    return "\n".join(lines)


def format_runtime_table(rows: list[dict]) -> str:
    head = (f"{'runtime / file':<26}{'thr':>4}{'MiB':>7}{'load s':>8}{'TTFT s':>8}"
            f"{'prefill t/s':>12}{'decode t/s':>11}{'bound t/s':>10}{'of bound':>9}{'peak RSS':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        opt = (lambda v, f: format(v, f) if v is not None else "—")
        rss = "—" if r["peak_rss_bytes"] is None else f"{r['peak_rss_bytes'] / 2**20:.0f} MiB"
        lines.append(f"{r['name']:<26}{r['threads']:>4}{r['size_bytes'] / 2**20:>7.0f}"
                     f"{opt(r['load_s'], '.2f'):>8}{opt(r['ttft_s'], '.3f'):>8}"
                     f"{r['prefill']:>12.0f}{r['decode']:>11.1f}{r['bound']:>10.1f}"
                     f"{r['fraction']:>9.0%}{rss:>10}")
    return "\n".join(lines)


def first_divergence(a: list[int] | None, b: list[int] | None) -> int | None:
    """The first position where two generations differ (None: identical)."""
    if a is None or b is None:
        return None
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def plot_roofline(rows: list[dict], machine: dict, *, n_weights: int, prompt_tokens: int = 128):
    """The roofline of one thread count: attainable FLOP/s = min(peak, bandwidth × intensity),
    and each runtime's decode (intensity = 2·weights / bytes per token) and prefill (the weights
    read once for the whole prompt) as achieved FLOP/s."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    bw, peak = machine["bandwidth_bytes_per_s"], machine["peak_flops"]
    x = np.logspace(-1, 3, 200)
    ax.plot(x, np.minimum(peak, bw * x), "k-", lw=1.5, label="roofline (fp32 peak, read bandwidth)")
    for i, r in enumerate(rows):
        flops = 2 * n_weights
        ai_dec = flops / r["bytes_per_token"]
        ai_pre = flops * prompt_tokens / r["size_bytes"]
        c = f"C{i % 10}"
        ax.scatter(ai_dec, r["decode"] * flops, color=c, marker="o", label=f"{r['name']} decode")
        ax.scatter(ai_pre, r["prefill"] * flops, color=c, marker="s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte read)")
    ax.set_ylabel("FLOP/s")
    ax.set_title("decode (circles) and prefill (squares) against the machine's roofline")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def deployment_widget(quality: dict, runtimes: list[dict]):
    """Pick a runtime × file and a thread count: size, quality against PyTorch fp32
    (:func:`runtime_quality`) and speed against the decode bound (:func:`runtime_rows`)."""
    import ipywidgets as W
    from IPython.display import display

    names = sorted({r["name"] for r in runtimes})
    threads = sorted({r["threads"] for r in runtimes})
    pick = W.Dropdown(options=names, description="runtime / file")
    thr = W.ToggleButtons(options=threads, description="threads")
    out = W.Output()

    def show(*_):
        out.clear_output()
        with out:
            r = next((x for x in runtimes if x["name"] == pick.value
                      and x["threads"] == thr.value), None)
            if r is None:
                print("not recorded")
                return
            q = quality.get(pick.value.replace("llama-bench", "llama.cpp"))
            print(f"{pick.value}, {thr.value} thread(s): {r['size_bytes'] / 2**20:.0f} MiB")
            print(f"  decode {r['decode']:.1f} tokens/s = {r['fraction']:.0%} of the bound "
                  f"{r['bound']:.1f} (reads {r['bytes_per_token'] / 2**20:.0f} MiB a token)")
            print(f"  prefill {r['prefill']:.0f} tokens/s")
            if q is None:
                print("  quality: not measured on the lesson's tokens")
            else:
                print(f"  quality against PyTorch fp32: ΔNLL {q['delta_nll']:+.4f} ± "
                      f"{q['se']:.4f} ({verdict(q['delta_nll'], q['se'])}), KL "
                      f"{q['kl_mean']:.4f}, top-1 {q['top1']:.1%}")

    pick.observe(show, "value")
    thr.observe(show, "value")
    show()
    display(W.VBox([pick, thr, out]))
    return pick, thr, out


def llama_files(types=("Q4_0",), *, folder=None, model_name: str | None = None) -> dict:
    """The model's F32 GGUF (llama.cpp's converter, cached) and each of ``types`` made from it
    by ``llama-quantize`` (token embedding Q8_0) in ``folder`` (a new temporary one by default):
    ``{"F32": path, type: path, ...}``."""
    import tempfile
    from pathlib import Path

    from edgellm.deploy.export_quant import cached_f32
    from edgellm.deploy.llamacpp_quant import quantize
    from edgellm.models import DEFAULT_MODEL, load_model

    folder = Path(folder or tempfile.mkdtemp(prefix="edgellm-lesson11-"))
    model, tok = load_model(model_name or DEFAULT_MODEL, quiet=True, device="cpu")
    files = {"F32": cached_f32(model, tok)}                # kept in the cache, by weights
    del model
    for t in types:
        files[t] = quantize(files["F32"], folder / f"{t}.gguf", t, token_embedding_type="Q8_0")
    return files


def fit_time_per_token(rows: list[dict]) -> dict:
    """Least squares of decode seconds per token against bytes read per token over the files of
    one runtime and thread count: ``t = bytes / bandwidth_eff + t0``.  ``t0`` is the part of a
    token's time that reading weights does not explain (the kernels' arithmetic, quantizing the
    activations, the graph's per-operation overhead)."""
    x = np.array([r["bytes_per_token"] for r in rows], dtype=float)
    y = np.array([1.0 / r["decode"] for r in rows], dtype=float)
    if len(x) < 2:
        raise ValueError("fit_time_per_token needs at least two files")
    slope, t0 = np.polyfit(x, y, 1)
    pred = slope * x + t0
    return {"bandwidth_eff_bytes_per_s": 1.0 / slope if slope > 0 else float("inf"),
            "t0_s": float(t0), "max_rel_residual": float(np.max(np.abs(pred - y) / y)),
            "n_files": len(x)}
