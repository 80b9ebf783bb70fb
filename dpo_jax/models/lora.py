"""LoRA (Hu et al. 2021, arXiv 2106.09685) as a transform of params, not of the model.

For each targeted projection kernel W the policy uses W_eff = W + (alpha / r) * A @ B:

    adapters = lora.init_adapters(base, config, rng)   # only A and B are trained
    params = lora.merge(base, adapters, config)        # ordinary params of the same model
    logits = model.apply({"params": params}, tokens, ...)

so the model code is unchanged and the same params feed training, sampling and export
(`merge` then `models.to_hf`: a plain Hugging Face directory). The base stays frozen (it
may be stored in bfloat16); the DPO reference is the base itself, the adapters switched
off: the same arrays, never a second copy.

Shapes: a kernel `W: [*lead, *in, *out]` (our kernels keep their head axes: q/k/v
`[D, N, H]` have one input dim, o `[N, H, D]` two; `lead` is a stacked-layer axis when
layers are scanned) gets `lora_a: [*lead, *in, r]` and `lora_b: [*lead, r, *out]`, with
logical axes taken from W's (`adapter_specs`), so adapters shard like their kernels.
Init as PEFT: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)),
B = 0, so W_eff = W before the first update. Adapter dropout is not offered: it acts on
activations, which a params-level transform does not see.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import PartitionSpec as P

# Projection name -> (number of input dims, kernel ndim without stacked-layer axes).
PROJECTIONS = {
    "q": (1, 3), "k": (1, 3), "v": (1, 3), "o": (2, 3),
    "gate": (1, 2), "up": (1, 2), "down": (1, 2),
}  # fmt: skip
ADAPTER_KEYS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r, as PEFT), and the projections that
    get adapters (names of `PROJECTIONS`; default all attention and MLP projections)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = tuple(PROJECTIONS)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an int >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        unknown = sorted(set(self.targets) - set(PROJECTIONS))
        if unknown or not self.targets:
            raise ValueError(
                f"LoRA targets {list(self.targets)}: expected a non-empty subset of "
                f"{list(PROJECTIONS)} (unknown: {unknown})"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _targets(base, config: LoraConfig):
    """(path, projection name, kernel) of every targeted kernel of `base`, sorted."""
    out = []
    for path, w in sorted(traverse_util.flatten_dict(base).items()):
        name = path[-1]
        if name.endswith("_kernel") and name[: -len("_kernel")] in config.targets:
            out.append((path, name[: -len("_kernel")], w))
    if not out:
        raise ValueError(f"no kernel of the params matches the LoRA targets {config.targets}")
    return out


def _split(w, projection: str) -> tuple[int, int]:
    """(number of leading stacked axes, number of input dims) of a kernel."""
    n_in, ndim = PROJECTIONS[projection]
    return w.ndim - ndim, n_in


def init_adapters(base, config: LoraConfig, rng) -> dict:
    """Float32 adapters `{..kernel path..: {"lora_a", "lora_b"}}` for `base` (params or
    ShapeDtypeStructs); B = 0, so the merged params equal the base."""
    adapters = {}
    for i, (path, projection, w) in enumerate(_targets(base, config)):
        lead, n_in = _split(w, projection)
        in_shape, out_shape = w.shape[lead : lead + n_in], w.shape[lead + n_in :]
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a_shape = (*w.shape[:lead], *in_shape, config.rank)
        a = jax.random.uniform(jax.random.fold_in(rng, i), a_shape, jnp.float32, -bound, bound)
        b = jnp.zeros((*w.shape[:lead], config.rank, *out_shape), jnp.float32)
        adapters[(*path, "lora_a")], adapters[(*path, "lora_b")] = a, b
    return traverse_util.unflatten_dict(adapters)


def delta(a, b, lead: int) -> jax.Array:
    """A @ B over the rank axis: [*lead, *in, r] x [*lead, r, *out] -> [*lead, *in, *out]."""
    product = lambda a, b: jnp.tensordot(a, b, axes=1)  # noqa: E731
    for _ in range(lead):
        product = jax.vmap(product)
    return product(a.astype(jnp.float32), b.astype(jnp.float32))


def merge(base, adapters, config: LoraConfig, dtype=jnp.float32):
    """The params the policy runs with: targeted kernels W + (alpha / r) A @ B, summed in
    float32 and stored in `dtype`; every other param the base's own array (not copied).

    dtype: float32 (export, float32 compute: a bfloat16 base does not round the small
    update away) or the model's compute dtype: the model casts each kernel to it at use
    anyway, so a wider merged copy would only cost memory (the train step passes it).
    """
    flat = traverse_util.flatten_dict(base)
    flat_adapters = traverse_util.flatten_dict(adapters)
    for path, projection, w in _targets(base, config):
        a, b = (flat_adapters[(*path, key)] for key in ADAPTER_KEYS)
        lead, _ = _split(w, projection)
        merged = w.astype(jnp.float32) + config.scale * delta(a, b, lead)
        flat[path] = merged.astype(dtype)
    return traverse_util.unflatten_dict(flat)


def adapter_specs(base_specs, base, config: LoraConfig) -> dict:
    """Logical PartitionSpecs of the adapters from their kernels' (`parallel.
    param_logical_specs`): A keeps W's leading and input axes, B its leading and output
    axes; the rank axis is not sharded."""
    flat_specs = traverse_util.flatten_dict(base_specs)  # a PartitionSpec is not a dict: a leaf
    specs = {}
    for path, projection, w in _targets(base, config):
        lead, n_in = _split(w, projection)
        names = tuple(flat_specs[path]) + (None,) * (w.ndim - len(flat_specs[path]))
        specs[(*path, "lora_a")] = P(*names[: lead + n_in], None)
        specs[(*path, "lora_b")] = P(*names[:lead], None, *names[lead + n_in :])
    return traverse_util.unflatten_dict(specs)
