"""Quantization-aware training (lesson 13): fake quantization with STE, LSQ, BitNet b1.58."""
