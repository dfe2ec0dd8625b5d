"""Quantization: schemes, quantizers, runtime modules, artifacts, mixed precision, GGUF export."""
