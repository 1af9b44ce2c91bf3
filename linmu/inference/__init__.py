"""Inference: the fixed-size cache and generation helpers."""
