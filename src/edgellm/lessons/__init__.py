"""Each lesson's tables, plots and widgets: pure functions over records and tensors, and thin
ipywidgets views over them.  A technique never imports from here.

- :mod:`edgellm.lessons.tour`          00: parameters by module, device memory budgets
- :mod:`edgellm.lessons.perplexity`    01: protocol windows, context per token, PPL vs ctx
- :mod:`edgellm.lessons.formats`       02: number formats on a tensor, error vs bits
- :mod:`edgellm.lessons.weight_quant`  03: the recorded weight-quantization tables and trade-off
- :mod:`edgellm.lessons.act_quant`     04: activation-quantization results, KV-cache bytes
- :mod:`edgellm.lessons.production`    05: bitsandbytes / torchao tables and block layouts
- :mod:`edgellm.lessons.pruning`       06: masks, sparsity sweeps, structured tables, widget
- :mod:`edgellm.lessons.distill`       07: KL-direction toy and widget, teacher cost, loss tables
"""
