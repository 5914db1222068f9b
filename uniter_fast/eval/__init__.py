"""Evaluation: validation losses per task and zero-shot image-text retrieval."""
