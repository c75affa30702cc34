"""What a run needs around the pipeline's steps: the recipe (config.py), crash-safe checkpoints (checkpoints.py),
faults and safe writes (safety.py), what it leaves behind (outputs.py), the Hub (hub.py), GGUF models (gguf.py),
the on-disk cache (cache.py) and `sft-hf launch` (launch.py)."""
