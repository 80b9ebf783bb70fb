"""Test setup: 8 fake CPU devices for sharding tests, float32 matmuls at full precision."""

import os

# Must happen before jax is imported anywhere: sharding tests need 8 devices on a CPU host.
# The two compiler flags cut XLA:CPU compile time (most of a tiny-model test) by ~2-3x;
# numerics stay float32-exact, tolerances are unaffected.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_llvm_disable_expensive_passes=true",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The train-step fixtures (model, policy, reference, padded, packed) shared by test files.
pytest_plugins = ["train_testlib"]
