"""Training: the config, the Trainer subclass, the pipeline from config to trainer, checkpoints."""
