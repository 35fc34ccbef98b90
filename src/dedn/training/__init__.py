"""Training: the trainer, checkpoints, the run folder, devices and torch.distributed."""
