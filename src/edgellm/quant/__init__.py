"""Weight quantization: number formats, RTN, packing, size accounting, saving (lessons 02–03).

Importing the package imports none of its modules (and no backend library):

- :mod:`edgellm.quant.qtensor`  ``QTensor`` (codes + scales) and ``QuantError``
- :mod:`edgellm.quant.rtn`      round-to-nearest min/max quantization per channel / group
- :mod:`edgellm.quant.formats`  INTn, FP8 (E4M3, E5M2), FP4 (E2M1), NF4, MXFP4, bitsandbytes variants
- :mod:`edgellm.quant.gguf_formats`  llama.cpp block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, MXFP4)
- :mod:`edgellm.quant.pack`     bit packing of 2/3/4/…-bit codes into bytes
- :mod:`edgellm.quant.size`     bits per weight and bytes for a whole model
- :mod:`edgellm.quant.modules`  fake-quant ``QuantLinear`` that swaps into a model and back
- :mod:`edgellm.quant.save`     packed safetensors + JSON: save and reload quantized models
- :mod:`edgellm.lessons.formats`  pure functions behind lesson 02's plots and widget
- :mod:`edgellm.quant.actstats`  activation statistics: outlier features, massive activations
- :mod:`edgellm.quant.actquant`  simulated activation quantization (W8A8, W4A8, FP8 activations)
- :mod:`edgellm.quant.smoothquant`  SmoothQuant: migrate activation outliers into the weights
- :mod:`edgellm.quant.llm_int8`  LLM.int8(): vector-wise int8 matmul with fp16 outlier columns
- :mod:`edgellm.quant.rotate`   Hadamard / random orthogonal rotation folded into the weights
- :mod:`edgellm.quant.kv`       KV-cache quantization where attention reads the cache
- :mod:`edgellm.quant.lwc`      OmniQuant-style learnable weight clipping (and its clip cache)
- :mod:`edgellm.quant.gptq`, :mod:`~edgellm.quant.awq`, :mod:`~edgellm.quant.imatrix`,
  :mod:`~edgellm.quant.mixed`  calibrated weight quantizers (on :mod:`edgellm.calib` and
  :mod:`edgellm.hessian`)
- :mod:`edgellm.quant.blockwise`  our NF4 / FP4 / INT4 block formats and double quantization
- :mod:`edgellm.quant.backends`  bitsandbytes and torchao on the model
- :mod:`edgellm.quant.result`   ``QuantResult``: what every ``apply_*`` quantizer returns
- :mod:`edgellm.quant.apply`    ``quantize_model``: the entry point ``edgellm quantize`` calls

The tied embedding / lm_head is never quantized by these tools; sizes report it separately
(``rotate`` unties it, since the final norm is folded into lm_head but not into the embedding).
"""
