"""Checkpoint readers and writers: GGUF files and Hugging Face safetensors directories."""
