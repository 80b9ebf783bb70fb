"""Training: the jitted DPO/SFT steps and the loop around them.

`README.md` beside this file maps each part of a DPO update to its module: `validate`
(config), `inputs` (data), `devices` (placement), `scoring` (log-probs), `steps` (the
jitted step), `unpaired` (the KTO step), `optimizers`, `state`, `reference_cache`, `loop`,
`checkpoints`, `metrics`;
`toy` is a marker-token task and in-memory driver for notebooks and tests.
"""
