"""Fine-tuning: task data (``data``), evaluation metrics (``metrics``), LoRA and the trainer."""
