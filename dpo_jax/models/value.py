"""`ValueModel`: our decoder trunk with a scalar value head on every token (PPO's critic).

    values = model.apply({"params": p}, tokens, positions=, segment_ids=)   # [N, L] float32

`values[:, t] = h_t @ score`: the final normed hidden state (`DecoderLM.features`) at token t
times a `[D, 1]` head without bias: the value of the state after token t, i.e. before token
t + 1 is sampled. Its params are exactly `RewardModel`'s (trunk without `lm_head`, plus
`score`), so a trained reward model initialises it as it is (as TRL's PPO starts its value
model from the reward model), and `reward.from_lm_params` builds it from a policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpo_jax.models.reward import RewardModel


class ValueModel(RewardModel):
    """Decoder trunk + `score` head applied per token. Build it with
    `ValueModel(reward.trunk_config(lm_config))`."""

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Values [N, L] float32 of rows tokens [N, L] (padding positions hold junk)."""
        hidden, _ = self.features(tokens, positions, segment_ids)
        return (hidden.astype(jnp.float32) @ self.score.astype(jnp.float32))[..., 0]
