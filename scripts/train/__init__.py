"""Fine-tuning, evaluation and export (needs the `train` extra: torch, torchvision...).

`pipeline.run_recipe` runs every task through the same steps; `tasks/` holds one module per task
(what is its own: data, network, loss, validation, export inputs, parity, metrics); `data/` the
datasets, `nets/` the networks, `fit.py` the shared training loop, `capabilities.py` which
command-line option each task takes. Nothing here imports `service/` or the tools built on it.
"""
