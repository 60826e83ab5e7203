"""Our quantized weights written into llama.cpp's GGUF blocks, bit for bit.

Three of our formats are llama.cpp block types already, when groups are 32 wide and scales fp16:

=========================  ========  ===========================================
ours (``edgellm quantize``)  GGUF     block of 32 weights
=========================  ========  ===========================================
4-bit symmetric, g32       Q4_0      ``w = d·(q − 8)``: our code ``c ∈ [−7, 7]`` is ``q − 8``
4-bit asymmetric, g32      Q4_1      ``w = d·q + m``: our scale is ``d``, our offset ``m``
8-bit symmetric, g32       Q8_0      ``w = d·q``, ``q`` int8
=========================  ========  ===========================================

So a GPTQ, AWQ or RTN model saved by ``edgellm quantize --out`` becomes a GGUF that llama.cpp
runs with the very codes and scales we chose.  The file is built from llama.cpp's own F32
conversion of the dequantized model (so every name, every metadata key and the Q/K row order
of the rotary layout are the converter's), with each linear's F32 data replaced by our blocks;
then every block is read back with ``gguf`` and checked against the F32 values it replaces.
A linear that cannot be written bit-exactly is an error, never an F32 fallback.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from edgellm.deploy.llamacpp import LlamaCppError

BLOCK_TYPES = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}


def check_block_settings(method: str, *, bits: int, group_size: int | None, sym: bool,
                         a_bits: int | None = None, kv_bits: int | None = None) -> None:
    """The settings whose codes fit one of llama.cpp's blocks (before anything is quantized)."""
    from edgellm.deploy.llamacpp import LlamaCppError

    fits = group_size == 32 and (bits == 4 or (bits == 8 and sym))
    if not fits:
        raise LlamaCppError(f"--gguf writes llama.cpp's blocks of 32: use --group-size 32 with "
                            f"--bits 4 (Q4_0 with --sym, Q4_1 without) or --bits 8 --sym (Q8_0); "
                            f"got --bits {bits} --group-size {group_size}")
    if method not in ("rtn", "gptq", "awq", "imatrix"):
        raise LlamaCppError(f"--gguf: --method {method} is not a plain weight quantizer; use rtn, "
                            "gptq, awq or imatrix")
    if a_bits is not None or kv_bits is not None:
        raise LlamaCppError("--gguf writes the weights only: drop --a-bits / --kv-bits")


def block_type(qt) -> str:
    """The GGUF type that stores ``qt`` exactly, else a clear :class:`LlamaCppError`."""
    kind = BLOCK_TYPES.get((qt.bits, qt.sym))
    if qt.fmt != "int" or kind is None or qt.group_size != 32 or qt.scale_bits != 16 \
            or (not qt.sym and (qt.offset_bits or 16) != 16):
        raise LlamaCppError(
            f"a {qt.bits}-bit {'symmetric' if qt.sym else 'asymmetric'} {qt.fmt} tensor with "
            f"groups of {qt.group_size} and {qt.scale_bits}-bit scales has no exact GGUF block; "
            "quantize with --group-size 32 and 4-bit (sym → Q4_0, asym → Q4_1) or 8-bit sym "
            "(Q8_0) to export it")
    return kind


def as_block_qtensor(qt):
    """``qt`` relabelled as the GGUF block type that stores it (codes, scales unchanged)."""
    from dataclasses import replace

    return replace(qt, fmt=block_type(qt))


def rope_row_order(n_rows: int, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives Q and K (``LlamaModel.permute``: within each
    head, the two rotary halves interleaved), as indices into the Hugging Face rows."""
    idx = torch.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(n_rows)


def permute_rows(qt, order: torch.Tensor):
    from dataclasses import replace

    return replace(qt, codes=qt.codes[order], scale=qt.scale[order], offset=qt.offset[order])


def gguf_names(model) -> dict[str, str]:
    """Our linear names → their GGUF tensor names (``blk.N.attn_q.weight`` …)."""
    import gguf

    from edgellm.models import linear_layers

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    out = {}
    for name in linear_layers(model):
        g = tmap.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if g is None:
            raise LlamaCppError(f"{name}: no GGUF name for this layer in llama.cpp's map")
        out[name] = g
    return out


def write_blocks(f32_gguf, out, blocks: dict[str, tuple[str, np.ndarray]]) -> Path:
    """Copy ``f32_gguf`` to ``out`` (metadata, every tensor), replacing the tensors in ``blocks``
    (GGUF name → (type, uint8 bytes ``(rows, bytes per row)``)); written beside ``out``, then
    renamed."""
    import gguf

    reader = gguf.GGUFReader(str(f32_gguf))
    arch = bytes(reader.get_field(gguf.Keys.General.ARCHITECTURE).parts[-1]).decode()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    writer = gguf.GGUFWriter(str(tmp), arch=arch, use_temp_file=False)
    try:
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        data = []
        for t in reader.tensors:
            if t.name in blocks:
                qtype, raw = blocks[t.name]
                writer.add_tensor_info(t.name, raw.shape, raw.dtype, raw.nbytes,
                                       raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
                data.append(raw)
            else:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes,
                                       raw_dtype=t.tensor_type)
                data.append(t.data)
        missing = set(blocks) - {t.name for t in reader.tensors}
        if missing:
            raise LlamaCppError(f"{sorted(missing)[:3]}: not tensors of {f32_gguf}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for arr in data:
            writer.write_tensor_data(arr)
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def check_blocks(gguf_path, f32_gguf, names) -> int:
    """Read every tensor in ``names`` back from ``gguf_path``, dequantize it with ``gguf`` and
    compare with the F32 values of ``f32_gguf`` (which hold the dequantized weights): the number
    of blocks checked; any difference is a :class:`LlamaCppError`."""
    import gguf
    from gguf import quants

    got = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors if t.name in names}
    want = {t.name: t for t in gguf.GGUFReader(str(f32_gguf)).tensors if t.name in names}
    n = 0
    for name in names:
        t = got[name]
        deq = quants.dequantize(t.data, t.tensor_type).reshape(want[name].data.shape)
        if not np.array_equal(deq.astype(np.float32), np.asarray(want[name].data)):
            raise LlamaCppError(f"{name}: the {t.tensor_type.name} blocks read back differ from "
                                "the weights they encode")
        n += deq.size // 32
    return n
