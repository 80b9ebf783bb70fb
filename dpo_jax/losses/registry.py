"""Losses by name: `names()`, `get(name)`, `requires_reference(name)`."""

from __future__ import annotations

from dpo_jax.losses import pairwise, reference_free, token_level, unpaired
from dpo_jax.losses.core import Loss

_PAIRED = {
    loss.name: loss for loss in (*pairwise.LOSSES, *reference_free.LOSSES, *token_level.LOSSES)
}
_UNPAIRED = {loss.name: loss for loss in unpaired.LOSSES}


def names() -> list[str]:
    """Names of the paired losses, all called as `fn(PreferenceLogps, *, beta, **hparams)`."""
    return sorted(_PAIRED)


def unpaired_names() -> list[str]:
    """Names of the unpaired losses, called as `fn(UnpairedLogps, *, beta, **hparams)`."""
    return sorted(_UNPAIRED)


def get(name: str | Loss) -> Loss:
    """The loss registered under `name` (a `Loss` is returned as it is)."""
    if isinstance(name, Loss):
        return name
    loss = _PAIRED.get(name) or _UNPAIRED.get(name)
    if loss is None:
        raise ValueError(
            f"unknown loss {name!r}; known losses: {names()} (unpaired: {unpaired_names()})"
        )
    return loss


def requires_reference(name: str | Loss) -> bool:
    """Whether the loss needs reference log-probs (`ref_*` fields)."""
    return get(name).requires_reference
