"""Fine-tuning: the training loop (``trainer``), its checkpoints (``checkpoint``) and the
learning-rate schedule (``schedule``)."""
