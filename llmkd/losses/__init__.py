"""Distillation losses: pure functions of tensors (no model, no Trainer)."""
from llmkd.losses.alm import alm_loss, boundary_logp
from llmkd.losses.chunked import chunked_divergence
from llmkd.losses.divergences import KINDS, divergence, per_token_divergence
from llmkd.losses.sparse import sparse_divergence
from llmkd.losses.taid import TAIDSchedule, taid_loss
from llmkd.losses.uld import uld_loss

__all__ = ["KINDS", "chunked_divergence", "divergence", "per_token_divergence", "sparse_divergence",
           "TAIDSchedule", "taid_loss", "alm_loss", "boundary_logp", "uld_loss"]
