"""Training, evaluation and export for each task (needs the `train` extra: torch, torchvision...)."""
