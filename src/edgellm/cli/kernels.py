"""``edgellm kernels bench``: W4A32 GEMV variants (Q4_0 weights, float32 activations) against
the machine's read bandwidth and llama.cpp's own Q4_0 kernel;
``edgellm kernels fusion``: SiLU·up and RMSNorm fused into their neighbours, or not;
``edgellm kernels sparsity``: how concentrated the MLP's activations are (PowerInfer, Deja Vu).

::

    edgellm kernels bench --shapes 1536x576,49152x576 --threads 1 --json
    edgellm kernels bench --variants torch_packed,cpp_simd,llamacpp_q4_0 --repeats 9 --json
    edgellm kernels fusion --tokens 1,256 --json
    edgellm kernels sparsity --model smollm2-135m --data pydoc --n-samples 16 --json

``bench`` keys: ``variants`` (per variant and shape: ``name``, ``shape``, ``gbytes_per_s``,
``fraction_of_bound``, ``max_abs_err``, ``seconds``), ``skipped`` (variant → why),
``bound_gbytes_per_s``, ``llc_bytes``, ``cpu``, ``cpu_capability``, ``threads``.
``fusion`` keys: ``rows`` (``name``, ``tokens``, ``seconds``, ``max_abs_err``), ``skipped``.
``sparsity`` keys: ``layers`` (per layer: ``top_mass_per_token``, ``top_mass_ranked``,
``zero_fraction``, ``near_zero_fraction``, ``gate_negative_fraction``, ``hot_jaccard``),
``mean``, ``random_jaccard``.
"""

from __future__ import annotations

import argparse

from edgellm.cli.common import UsageError, add_json_arg, add_model_arg, add_seed_arg

VARIANT_NAMES = "unpack_matmul, torch_packed, cpp_scalar, cpp_simd, llamacpp_q4_0"


def add_parsers(sub) -> None:
    p = sub.add_parser("kernels", help="the kernels behind packed weights: GEMV variants, "
                                       "fusion, activation sparsity",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ksub = p.add_subparsers(dest="kernels_command", required=True, metavar="KERNELS_COMMAND")

    b = ksub.add_parser("bench", help="Q4_0 GEMV variants: GB/s against the read bandwidth")
    b.add_argument("--shapes", default="1536x576,49152x576",
                   help="weight shapes N x K (rows x columns), comma-separated; K a multiple of 32")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--variants", default=VARIANT_NAMES.replace(" ", ""),
                   help=f"comma-separated, from: {VARIANT_NAMES}")
    b.add_argument("--repeats", type=int, default=5, help="timed passes over the copies")
    b.add_argument("--footprint-mib", type=float,
                   help="MiB of rotating copies per variant (default: 4 x the last-level cache)")
    b.add_argument("--bound-mib", type=int, default=512,
                   help="MiB of the read-bandwidth measurement")
    add_seed_arg(b)
    add_json_arg(b)
    b.set_defaults(func=run_bench)

    f = ksub.add_parser("fusion", help="SiLU·up and RMSNorm, fused or not, at decode shapes")
    f.add_argument("--hidden", type=int, default=576)
    f.add_argument("--intermediate", type=int, default=1536)
    f.add_argument("--tokens", default="1,256", help="token counts, comma-separated")
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--repeats", type=int, default=5)
    f.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    add_seed_arg(f)
    add_json_arg(f)
    f.set_defaults(func=run_fusion)

    s = ksub.add_parser("sparsity", help="concentration of the MLP's activations per layer")
    add_model_arg(s, cpu_only="kernels sparsity (lesson 12's CPU kernels)")
    s.add_argument("--data", default="pydoc", help="corpus (train split) of the windows")
    s.add_argument("--n-samples", type=int, default=16, help="windows (two halves compared)")
    s.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    s.add_argument("--top", type=float, default=0.1, help="the hot fraction of neurons")
    add_seed_arg(s)
    add_json_arg(s)
    s.set_defaults(func=run_sparsity)


def _positive(**flags) -> None:
    for name, v in flags.items():
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {v}: give a positive number")


def _ints(text: str, flag: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give whole numbers separated by commas") from None
    if not out or min(out) < 1:
        raise UsageError(f"{flag} {text!r}: give positive numbers")
    return out


def run_bench(args) -> dict:
    from edgellm.kernels.apply import bench, check_variants, parse_shapes

    shapes = parse_shapes(args.shapes)
    variants = check_variants(v.strip() for v in args.variants.split(",") if v.strip())
    _positive(threads=args.threads, repeats=args.repeats, footprint_mib=args.footprint_mib,
              bound_mib=args.bound_mib)
    return bench(shapes=shapes, threads=args.threads, variants=variants, repeats=args.repeats,
                 footprint_mib=args.footprint_mib, bound_mib=args.bound_mib, seed=args.seed)


def run_fusion(args) -> dict:
    from edgellm.kernels.apply import fusion

    tokens = _ints(args.tokens, "--tokens")
    _positive(hidden=args.hidden, intermediate=args.intermediate, threads=args.threads,
              repeats=args.repeats)
    return fusion(hidden=args.hidden, intermediate=args.intermediate, tokens=tokens,
                  threads=args.threads, repeats=args.repeats, compile=not args.no_compile,
                  seed=args.seed)


def run_sparsity(args) -> dict:
    from edgellm.cli.common import check_model_name
    from edgellm.data import load_text
    from edgellm.kernels.apply import sparsity
    from edgellm.kernels.sparsity import top_k

    top_k(10, args.top)
    if args.n_samples < 2:
        raise UsageError(f"--n-samples {args.n_samples}: give at least 2 (the hot sets of two "
                         "halves of the windows are compared)")
    _positive(seq_len=args.seq_len)
    check_model_name(args.model)
    load_text(args.data, "train")
    return sparsity(args.model, data=args.data, n_samples=args.n_samples, seq_len=args.seq_len,
                    top=args.top, seed=args.seed)
