"""Knowledge distillation (lesson 07): white-box KD losses, cached teacher logits, SeqKD."""
