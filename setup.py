"""dpo_jax: Direct Preference Optimization and its loss family in JAX/Flax.

Install for development and tests (versions pinned by constraints.txt):

    pip install -e ".[test]" -c constraints.txt
"""

from setuptools import find_packages, setup

# Ranges we test against; constraints.txt pins the exact versions of a tested run.
RUNTIME = [
    "jax>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "ml-collections>=1.1,<2",
    "transformers>=5.24,<6",
    "safetensors>=0.8,<0.9",
    "numpy>=2.4,<3",
    "tqdm>=4.70,<5",
    "tensorboardX>=2.6,<3",
    "grain>=0.2.18,<0.3",
    "tensorflow-datasets>=4.9.10,<5",
    "array-record>=0.8,<0.9",
    "datasets>=5.2,<6",
    "pyarrow>=26,<27",
    "absl-py>=2.5,<3",
    "matplotlib>=3.11,<4",
    # Lexicon sentiment reward (evaluation ground truth of the IMDb-style experiment), offline.
    "vaderSentiment>=3.3.2,<4",
]

# `pip install -e ".[eval]"`: only the Hugging Face classifier reward (PyTorch
# AutoModelForSequenceClassification) needs torch; everything else runs without it.
EVAL = ["torch==2.13.0"]

# `pip install -e ".[tpu]"`: libtpu, the TPU compiler. On a TPU VM it runs the training;
# on any other machine `python -m dpo_jax.plan` compiles the step for a TPU topology with it.
# Pinned to the jax of constraints.txt: libtpu must match the jaxlib it plugs into.
TPU = ["jax[tpu]==0.10.2"]

TEST = [
    # torch only for parity tests against transformers' PyTorch models and TRL.
    "torch==2.13.0",
    "trl>=1.16,<2",
    "pytest>=9.2,<10",
    "pytest-xdist>=3.8,<4",
    "pytest-rerunfailures>=16.7,<17",
    "hypothesis>=6.170,<7",
    "chex>=0.1.92,<0.2",
    "ruff>=0.17,<0.18",
    "nbformat>=5.11,<6",
    "nbclient>=0.11,<0.12",
    "ipykernel>=7.4,<8",
]

setup(
    name="dpo_jax",
    version="0.1.0",
    description="Direct Preference Optimization and its loss family in JAX/Flax",
    packages=find_packages(include=["dpo_jax", "dpo_jax.*"]),
    python_requires=">=3.11,<3.12",
    install_requires=RUNTIME,
    extras_require={"test": TEST, "eval": EVAL, "tpu": TPU},
    entry_points={
        "console_scripts": [
            "dpo-jax=dpo_jax.main:run",
            "dpo-jax-evaluate=dpo_jax.evaluate:run",
        ]
    },
)
