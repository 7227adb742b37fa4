"""graft's artifact contract: manifest schema, loader, and the pre/postprocessing that
training, export, evaluation and serving all share. Pure numpy/PIL/tokenizers, no torch."""
