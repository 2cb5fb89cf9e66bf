"""Core library: networks, paths, objectives, data, EMA and the training loop."""
