"""DPO with the paper's defaults (Rafailov et al. 2023, arXiv 2305.18290, reference code).

beta 0.1, RMSprop lr 1e-6 with 150 linear warmup steps, batch 64, max_length 512,
max_prompt_length 256, gradient norm clipped at 10. The policy and the frozen reference
start from a local Hugging Face checkpoint (typically your SFT model):

    python -m dpo_jax.main --config=configs/dpo.py --workdir=/tmp/dpo \
      --config.model.hf_path=/path/to/sft_model \
      --config.data.train_files=/path/to/train.jsonl --config.data.eval_files=/path/to/test.jsonl

ARG: '' (the paper's setup) | 'tiny' (seconds on a CPU, the variant the tests run) |
'<loss name>' (same run with another loss from dpo_jax.losses, e.g. 'ipo', 'hinge').
The config also carries a beta sweep: add `--sweep_index=-1` to run all of it.
"""

from dpo_jax.train.defaults import base_config, shrink_to_tiny


def get_config(arg=None):
    c = base_config()
    c.stages = ("dpo",)
    c.dpo.init_from = "model"
    c.dpo.steps = 1000
    c.dpo.batch_size = 64
    c.dpo.loss.name = "sigmoid"
    c.dpo.loss.beta = 0.1
    c.data.max_length = 512
    c.data.max_prompt_length = 256
    # The paper sweeps beta; each member runs in <workdir>/sweep_<i>.
    c.sweep = tuple({"dpo.loss.beta": beta} for beta in (0.05, 0.1, 0.5, 1.0))
    if arg == "tiny":
        shrink_to_tiny(c)
    elif arg:
        c.dpo.loss.name = arg
    c.lock()
    return c
