"""What a quantizer returns: the packed tensors and a JSON-ready account of what it did."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgellm.quant.qtensor import QTensor


@dataclass
class QuantResult:
    """The result of an ``apply_*`` quantizer or of :func:`edgellm.quant.apply.quantize_model`.

    ``qtensors``  ``{linear name: QTensor}`` in model order: codes, scales, offsets of every
                  quantized weight (the model itself holds the dequantized values)
    ``info``      JSON-ready facts about the run (numbers, strings, lists, dicts of those):
                  AWQ's α per group, the mixed-precision allocation, LWC's error reductions…
    ``clips``     LWC's learned clipping strengths ``{name: {"gamma", "beta"}}`` (tensors, for
                  :func:`edgellm.quant.lwc.save_clips`); ``None`` for the other methods
    """

    qtensors: dict[str, QTensor]
    info: dict = field(default_factory=dict)
    clips: dict | None = None
