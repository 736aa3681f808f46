"""Fine-tuning: task data (``data``), evaluation metrics (``metrics``), the training loop
(``trainer``), its checkpoints (``checkpoint``), the learning-rate schedule (``schedule``) and
the ``flagopt finetune`` command (``commands``)."""

from flagopt.train.trainer import Trainer

__all__ = ["Trainer"]
