"""Kernels behind packed weights (lesson 12): W4 GEMV layouts, fusion."""
