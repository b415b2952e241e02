"""What a run needs around the algorithms: configs, model loading, data, the layer-by-layer
driver, perplexity, metrics files and tracking. `runners/run.py` is the thin Hydra entry point."""
