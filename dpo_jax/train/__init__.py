"""Training: state, pure jitted steps, optimizers, the loop, checkpoints, metrics.

state        TrainState (step, params, opt_state, rng)
steps        dpo_step / sft_step / eval_step (pure; jitted by parallel.jit_step)
scoring      batch checks, the policy/reference forwards and per-pair log-probs
optimizers   the paper's RMSprop + warmup, AdamW + cosine, SGD
defaults     the base run config (every field commented)
inputs       the run's data splits and iterators
loop         the main job: stages, evaluation, checkpoints, export
devices      placement and compilation for the jit (mesh) and pmap modes
checkpoints  orbax checkpoints with fallback past unreadable steps
metrics      JSON lines, TensorBoard, W&B, progress bar
toy          a marker-token toy task and in-memory driver (tests, notebooks)
"""
