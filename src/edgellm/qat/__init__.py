"""Quantization-aware training (lesson 13): fake quantization with a straight-through estimator,
learned step sizes (LSQ) and BitNet b1.58's ternary weights.

``fake``    the straight-through estimator and the weight / activation fake quantizers
``lsq``     learned step sizes (Esser et al., 2020)
``bitnet``  absmean ternary weights, 8-bit absmax activations, ternary packing (Ma et al., 2024)
``layers``  the fake-quantized linear layer, put into and taken out of a model
``apply``   the entry point behind ``edgellm qat`` (train, compare with PTQ, measure)
"""
