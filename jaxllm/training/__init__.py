"""Training: the train state and pure step, the loop, checkpoints, sharding, multi-host, metrics, the run directory."""
