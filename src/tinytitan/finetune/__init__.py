"""LoRA fine-tuning on a frozen (optionally quantized) base: adapters, data, training loop, merge."""
