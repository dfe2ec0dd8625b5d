"""Evaluation: perplexity, KL divergence against a reference, tasks."""
