"""The preference-loss family: pure functions of per-pair log-prob sums, a registry by name.

    from dpo_jax import losses
    lp = losses.PreferenceLogps(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                chosen_lengths, rejected_lengths)
    out = losses.get("sigmoid")(lp, beta=0.1)             # LossOutput(losses [B], rewards [B] x2)
    fn = losses.build(["sigmoid", "bco_pair"], [0.8, 0.2])  # TRL loss_type + loss_weights
    out = fn(lp, beta=0.1, label_smoothing=0.1)
    adv, ret = losses.ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)  # PPO's pieces

Every paired loss is `fn(logps: PreferenceLogps, *, beta, **hparams) -> LossOutput`; unknown
hyperparameters or missing inputs (e.g. no reference for a reference-based loss) raise a
ValueError naming the loss and the field. Names follow TRL's `loss_type`. The PPO (RLHF) math of
the paper's baseline lives in `losses.ppo` (per-token arrays, not pairs; not in the registry).
"""

from dpo_jax.losses import ppo
from dpo_jax.losses.core import Loss, LossOutput, PreferenceLogps
from dpo_jax.losses.modifiers import (
    F_DIVERGENCES,
    build,
    combine,
    f_divergence,
    f_divergence_scores,
    ld_logps,
    ld_weighted,
    wpo_weighted,
    wpo_weights,
)
from dpo_jax.losses.pairwise import (
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    bco_baseline_update,
    bco_pair,
    discopop,
    exo_pair,
    hinge,
    ipo,
    nca_pair,
    robust,
    rpo,
    sigmoid,
    sigmoid_norm,
    sppo_hard,
)
from dpo_jax.losses.reference_free import cpo, orpo, sft, sigmoid_reference_free, simpo
from dpo_jax.losses.registry import get, names, requires_reference, unpaired_names
from dpo_jax.losses.token_level import unlikelihood
from dpo_jax.losses.unpaired import (
    UnpairedLogps,
    UnpairedLossOutput,
    apo_zero_unpaired,
    kto,
    kto_kl_estimate,
)

__all__ = [
    "F_DIVERGENCES",
    "Loss",
    "LossOutput",
    "PreferenceLogps",
    "UnpairedLogps",
    "UnpairedLossOutput",
    "aot",
    "aot_unpaired",
    "apo_down",
    "apo_zero",
    "apo_zero_unpaired",
    "bco_baseline_update",
    "bco_pair",
    "build",
    "combine",
    "cpo",
    "discopop",
    "exo_pair",
    "f_divergence",
    "f_divergence_scores",
    "get",
    "hinge",
    "ipo",
    "kto",
    "kto_kl_estimate",
    "ld_logps",
    "ld_weighted",
    "names",
    "nca_pair",
    "orpo",
    "ppo",
    "requires_reference",
    "robust",
    "rpo",
    "sft",
    "sigmoid",
    "sigmoid_norm",
    "sigmoid_reference_free",
    "simpo",
    "sppo_hard",
    "unlikelihood",
    "unpaired_names",
    "wpo_weighted",
    "wpo_weights",
]
