"""Pure-functional Flax (linen) decoder LMs and Hugging Face checkpoint import/export."""

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import DecoderLM

__all__ = ["DecoderLM", "ModelConfig"]
