"""Kernels behind packed weights (lesson 12): W4 GEMV layouts, fusion, activation sparsity.

``q4`` (llama.cpp's Q4_0 grid, row and interleaved packing, the torch GEMV variants),
``cpp_source`` / ``cpp`` (the C++ variants, built at run time and cached), ``ggml_harness``
(llama.cpp's own Q4_0 matrix-vector product on the same shapes), ``fusion`` (SiLU·up, RMSNorm
folding), ``sparsity`` (PowerInfer / Deja Vu statistics of the MLP's activations) and ``apply``
(``bench``, ``fusion``, ``sparsity``: the records of ``edgellm kernels``)."""
