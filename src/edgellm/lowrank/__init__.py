"""Low-rank factorization (lesson 08): SVD, ASVD, SVD-LLM whitening, LoRC.

Importing the package imports none of its modules:

- :mod:`edgellm.lowrank.svd`     truncated SVD ``W ≈ B A``, energy kept, the break-even rank
- :mod:`edgellm.lowrank.asvd`    ASVD: input channels scaled by activation magnitude
- :mod:`edgellm.lowrank.svdllm`  SVD-LLM: truncation-aware whitening by the Cholesky factor of H
- :mod:`edgellm.lowrank.layers`  ``LowRankLinear``, save / load of a factorized model
- :mod:`edgellm.lowrank.lorc`    LoRC: a low-rank fix of the quantization error ``W − Q``, on
                                 one matrix or a whole model (``apply_lorc``, used by
                                 ``quantize_model(lorc_rank=K)``)
- :mod:`edgellm.lowrank.apply`   ``factorize_model``, the entry point of factorization
"""
