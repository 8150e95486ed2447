"""Training building blocks: pure torch step functions, data and model plumbing for each stage.

The stages (SFT, Bradley–Terry reward model, GRPO) are plain objects that a worker loop drives one
optimizer step at a time; the maths lives in small modules (`grpo`, `reward_model`, `sft_data`).
Nothing here imports ray: `cluster/train` wires these stages into Ray Train, reports metrics and
checkpoints, and handles restarts.
"""
