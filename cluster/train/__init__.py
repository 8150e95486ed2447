"""Ray Train wiring for `r1 train`: the TorchTrainer driver, the worker loop and the CLI commands."""
