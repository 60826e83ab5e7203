"""LoRA and QLoRA (lessons 09-10): LoRALinear from scratch, peft, adapters on device."""
