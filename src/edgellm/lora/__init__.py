"""LoRA and QLoRA (lessons 09-10): LoRALinear from scratch, peft, adapters on device.

``task``    the ``funcname`` task (describe a standard-library function → its dotted name) and
            users' JSONL tasks; exact match with aliases, ``format_valid``
``chat``    prompts, chat-template batches with the loss on the answer tokens, batched greedy
            generation, the answers' perplexity
``layers``  ``LoRALinear`` (frozen W + s·B A, merge / unmerge)
``apply``   ``apply_lora`` (ours), peft variants (DoRA, PiSSA, LoftQ, rsLoRA), QLoRA on a
            bitsandbytes NF4 base, adapters in peft's format, ``finetune`` and ``eval_task``
"""
