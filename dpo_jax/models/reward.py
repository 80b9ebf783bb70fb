"""`RewardModel`: our decoder trunk with a scalar reward head, and its Bradley-Terry loss.

    rewards = model.apply({"params": p}, tokens, positions=, segment_ids=)   # [N] float32

The reward of a row is `h_last @ score`: the final normed hidden state (`DecoderLM.features`)
at the row's last real token (the rightmost position with a non-zero segment id, so left and
right padding give the same value) times a `[D, 1]` head without bias, as transformers'
`*ForSequenceClassification.score` with `num_labels=1` (Llama, Mistral, Qwen2, Gemma:
`modeling_layers.GenericForSequenceClassification`; GPT-2, GPT-NeoX: their own classes; all
`nn.Linear(hidden_size, num_labels, bias=False)` in transformers 5.24).

Params: the decoder's without `lm_head` (the trunk is built tied, so no unembedding is
allocated, as HF's classifiers hold none) plus `score: [D, 1]` (logical axes embed, None).
`from_lm_params` turns a language model's params (an SFT stage, `from_hf`) into these.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.decoder import DecoderLM
from dpo_jax.models.layers import param


def trunk_config(config: ModelConfig) -> ModelConfig:
    """The reward model's config: the language model's with no separate `lm_head`."""
    return dataclasses.replace(config, tie_embeddings=True)


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """[N, L] segment ids -> [N] int32 index of each row's rightmost real token (segment id
    != 0); 0 for an all-padding row."""
    L = segment_ids.shape[-1]
    real = segment_ids != 0
    return jnp.max(jnp.where(real, jnp.arange(L, dtype=jnp.int32), 0), axis=-1)


class RewardModel(DecoderLM):
    """Decoder trunk + `score` head: one scalar reward per row. Build it with
    `RewardModel(trunk_config(lm_config))`."""

    def setup(self):
        super().setup()
        init = nn.initializers.normal(self.config.initializer_range)
        self.score = param(self, "score", (self.config.hidden_size, 1), ("embed", None), init)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Rewards [N] float32 of rows tokens [N, L] (segment id 0 = padding)."""
        hidden, _ = self.features(tokens, positions, segment_ids)
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        last = last_token_index(segment_ids)
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [N, D]
        return (h.astype(jnp.float32) @ self.score.astype(jnp.float32))[:, 0]


def from_lm_params(lm_params: dict, score: jax.Array) -> dict:
    """A language model's params -> the reward model's: `lm_head` dropped (the trunk is
    tied), `score: [D, 1]` added."""
    params = {k: v for k, v in lm_params.items() if k != "lm_head"}
    params["score"] = score
    return params


def bradley_terry_loss(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    margin: jax.Array | float = 0.0,
    center_rewards_coefficient: float = 0.0,
) -> jax.Array:
    """Per-pair Bradley-Terry reward-model loss [B] float32 (Ouyang et al. 2022, 2203.02155):

        loss_i = -log sigmoid(r_c,i - r_r,i - m_i) + c * (r_c,i + r_r,i)^2

    Its mean over pairs is TRL's `RewardTrainer.compute_loss` (trl 1.16):
    `-logsigmoid(r_c - r_r - margin).mean() + center_rewards_coefficient * mean((r_c + r_r)^2)`
    (the centring term of Eisenstein et al. 2023, 2312.09244, keeps rewards near zero; the
    BT loss alone is invariant to a shift). margin: per-pair m_i [B] or a scalar (Llama 2's
    preference-strength margin, 2307.09288); center_rewards_coefficient: c >= 0.
    """
    chosen = chosen_rewards.astype(jnp.float32)
    rejected = rejected_rewards.astype(jnp.float32)
    margin = jnp.asarray(margin, jnp.float32)
    loss = -jax.nn.log_sigmoid(chosen - rejected - margin)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * jnp.square(chosen + rejected)
    return loss
