"""peft and bitsandbytes under our settings: the ``LoraConfig`` of a method (DoRA, PiSSA,
rsLoRA), peft's model wrapping, and QLoRA's NF4 base (Dettmers et al. 2023)."""

from __future__ import annotations

import torch

from edgellm.lora.layers import TARGETS, LoRAError, check_rank


def peft_config(*, method: str = "lora", rank: int = 8, alpha: float | None = None,
                targets: str = "all", dropout: float = 0.0, rslora: bool = False,
                base: str | None = None):
    """The peft ``LoraConfig`` of our settings (``method`` picks DoRA / PiSSA / LoftQ)."""
    from peft import LoftQConfig, LoraConfig

    kwargs = {}
    if method == "dora":
        kwargs["use_dora"] = True
    elif method == "pissa":
        kwargs["init_lora_weights"] = "pissa"
    elif method == "loftq":
        kwargs.update(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4))
    return LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha),
                      lora_dropout=dropout, target_modules=list(TARGETS[targets]),
                      use_rslora=rslora, bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base, **kwargs)


def apply_peft(model, *, method: str = "lora", rank: int = 8, alpha: float | None = None,
               targets: str = "all", dropout: float = 0.0, rslora: bool = False, seed: int = 0,
               check: bool = True):
    """``peft.get_peft_model`` with :func:`peft_config`: the peft model (the base is wrapped).
    ``check``: check the rank against the linears' shapes (off for packed 4-bit weights)."""
    from peft import get_peft_model

    if check:
        check_rank(model, rank, targets)
    torch.manual_seed(seed)
    try:
        cfg = peft_config(method=method, rank=rank, alpha=alpha, targets=targets,
                          dropout=dropout, rslora=rslora)
    except ImportError as e:  # LoftQ's initialisation needs scipy
        raise LoRAError(f"method {method!r} needs a package that is not installed ({e}); "
                        "install it (pip install scipy) or use another --method") from None
    return get_peft_model(model, cfg)


def check_bnb() -> None:
    """bitsandbytes imports and runs a 4-bit matmul on the CPU, else a clear :class:`LoRAError`."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        w = torch.randn(64, 64)
        q, state = quantize_4bit(w, blocksize=64, quant_type="nf4")
        dequantize_4bit(q, state)
        del bnb
    except Exception as e:  # ImportError, a missing native library, an unsupported CPU …
        raise LoRAError(f"qlora needs bitsandbytes with its CPU backend, which cannot load here "
                        f"({type(e).__name__}: {str(e)[:200]}); pip install 'bitsandbytes>=0.45' "
                        "or use --method lora") from None


def apply_qlora(model, *, rank: int = 8, alpha: float | None = None, targets: str = "all",
                dropout: float = 0.0, rslora: bool = False, seed: int = 0,
                grad_checkpointing: bool = False):
    """QLoRA: every decoder linear to bitsandbytes NF4 with double quantization (fp32 compute),
    ``prepare_model_for_kbit_training``, then peft LoRA adapters in fp32."""
    from peft import prepare_model_for_kbit_training

    from edgellm.quant.backends.bitsandbytes import apply_bnb

    check_bnb()
    check_rank(model, rank, targets)
    apply_bnb(model, "nf4", double_quant=True)
    model.is_loaded_in_4bit = True   # what prepare_model_for_kbit_training looks for
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_checkpointing)
    return apply_peft(model, method="lora", rank=rank, alpha=alpha, targets=targets,
                      dropout=dropout, rslora=rslora, seed=seed, check=False)
