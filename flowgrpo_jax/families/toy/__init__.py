"""The toy family: a small compositional world of coloured shapes on a 3x3 grid, and a model
of it that trains on a CPU (the built-in default, `make demo`).

Its pieces, all in this folder: `world.py` (shapes, colours, rendering), `prompts.py` (the
GenEval-style prompt grammar, its compositional split and the shipped prompt files in
`data/`), `scenes.py` (scenes that satisfy a prompt), `checker.py` and `shape_classifier.py`
(a GenEval-style checker, the family's score), `robustness.py` (the checker's accuracy on
right and wrong images under corruptions), `reward.py` (the checker as the reward
`toy_geneval`), `text.py` and `model.py` (its text encoder and the 48 px MMDiT), `pretrain.py`
(flow-matching pretraining, which made the shipped base in `checkpoint/`).

As a `Generator`: the MMDiT is the model RL trains, the toy text encoder the frozen encoder,
and the latents are the image in [-1, 1] (no decoder). `model_config.path` names a toy model
folder (`model.save`); empty or absent means the shipped base checkpoint. The family itself
(`FAMILY`) is in `family.py`, not in this file: the reward server imports the checker
(`reward.py`) without importing JAX.
"""
