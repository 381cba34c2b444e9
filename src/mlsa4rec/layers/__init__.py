"""Reusable building blocks of the models."""

from mlsa4rec.layers.transformer import FeedForward, MultiHeadAttention, TransformerLayer

__all__ = ["FeedForward", "MultiHeadAttention", "TransformerLayer"]
