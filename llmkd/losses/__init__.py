"""Distillation losses: pure functions of tensors (no model, no Trainer)."""
from llmkd.losses.divergences import KINDS, divergence, per_token_divergence

__all__ = ["KINDS", "divergence", "per_token_divergence"]
