"""Tasks wire a model, its data, loss and evaluation into the one training engine."""
