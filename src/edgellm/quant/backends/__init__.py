"""The production quantization libraries on CPU, each behind one module with the same shape:
``import_*`` (a clear error when missing), ``check_*`` (bad settings before any work), ``apply_*``
(swap the decoder linears in place), ``*_dequantize`` (the weight a module really computes with).

- :mod:`edgellm.quant.backends.bitsandbytes`  NF4, FP4, double quantization, LLM.int8()
- :mod:`edgellm.quant.backends.torchao`       int8 weight-only, int8 dynamic activation

Importing this package imports neither library.  Their expected log noise on a CPU-only machine
is dropped by :func:`edgellm.models.quiet_library_logs`.
"""

from __future__ import annotations
