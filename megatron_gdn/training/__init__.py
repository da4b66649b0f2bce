"""Training machinery: optimizer parameter groups, LR schedule, checkpointing, FLOPs and logging."""
