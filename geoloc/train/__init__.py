"""Training layer: the loop, checkpoints, the distributed context and `train_run`."""
