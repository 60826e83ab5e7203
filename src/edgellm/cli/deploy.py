"""``edgellm export``: a model, a LoRA adapter, or the adapter merged into the model, to GGUF.

::

    edgellm export --format gguf --type F32 --out build/smollm2-f32.gguf --json
    edgellm export --adapter adapters/funccall --format gguf --out build/funccall-lora.gguf
    edgellm export --adapter adapters/funccall --merge --type Q8_0 --out build/merged-q8.gguf

llama.cpp's own converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, from the
llama-cpp-python source distribution) write ``F32``, ``F16``, ``BF16`` or ``Q8_0``; the token
embedding and the norms stay F32.  An adapter alone becomes a GGUF LoRA that llama.cpp applies at
run time on the base model's GGUF (``llama-cli --lora``; llama-cpp-python's ``lora_path``).
Keys: ``type``, ``size_bytes``, ``bpw`` (of the decoder blocks' tensors, from the file),
``tensor_types`` (every tensor's stored type, read back from the file).
"""

from __future__ import annotations

import argparse

from edgellm.cli.common import (
    add_json_arg,
    add_model_arg,
    check_in_dir,
    check_model_name,
    check_out_file,
)


def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="write a model or a LoRA adapter as a GGUF file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p)
    p.add_argument("--adapter", help="an adapter folder (edgellm finetune --out, or peft's)")
    p.add_argument("--merge", action="store_true",
                   help="with --adapter: merge it into the model and export the merged model")
    p.add_argument("--format", default="gguf", choices=["gguf"])
    p.add_argument("--type", default="F32", help="F32, F16, BF16 or Q8_0")
    p.add_argument("--out", required=True, help="the GGUF file to write")
    add_json_arg(p)
    p.set_defaults(func=run_export)


def run_export(args) -> dict:
    from edgellm.deploy.apply import export
    from edgellm.deploy.export import check_type
    from edgellm.errors import EdgeLLMError

    check_model_name(args.model)
    if args.merge and not args.adapter:
        raise EdgeLLMError("--merge merges an adapter: give --adapter DIR too")
    check_type(args.type, adapter=bool(args.adapter) and not args.merge)
    if args.adapter:
        check_in_dir(args.adapter, "--adapter", what="an adapter (edgellm finetune --out)")
        from edgellm.lora.apply import read_adapter_meta

        read_adapter_meta(args.adapter)
    check_out_file(args.out, "--out")
    return export(args.model, out=args.out, adapter=args.adapter, merge=args.merge,
                  qtype=args.type, progress=not args.json)
