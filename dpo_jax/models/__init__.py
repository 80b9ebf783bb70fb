"""Pure-functional Flax (linen) decoder LMs and Hugging Face checkpoint import/export."""

from dpo_jax.models import presets
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import DecoderLM, KVCache, init_cache
from dpo_jax.models.hf import from_hf, to_hf
from dpo_jax.models.hf_config import HFCheckpointError

__all__ = [
    "DecoderLM",
    "HFCheckpointError",
    "KVCache",
    "ModelConfig",
    "from_hf",
    "init_cache",
    "presets",
    "to_hf",
]
