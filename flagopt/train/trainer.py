"""FlagAI's ``Trainer``, for one process or many: data -> batches -> step -> eval -> checkpoint.

    trainer = Trainer(env_type="pytorch", max_steps=500, batch_size=8, lr=2e-4,
                      warm_up=0.1, save_dir="runs/notes", save_interval=100)
    summary = trainer.train(model, train_dataset=train, valid_dataset=valid,
                            collate_fn=collate)

The model is any ``nn.Module`` whose ``forward(**batch)`` returns an output with ``loss`` (and
``logits``), read by key as FlagAI's models are; only parameters with ``requires_grad`` are
trained, saved and restored, so a LoRA-wrapped model trains unchanged.

**Data order.** Each epoch visits the dataset in a permutation drawn from a generator seeded
with ``seed + epoch``. One optimizer step takes the next ``batch_size * world_size *
gradient_accumulation_steps`` indices of it (an incomplete last group is dropped, as
``DistributedSampler(drop_last=True)`` does); micro-step ``j`` on rank ``r`` gets its own
``batch_size`` slice. A resumed run recomputes the permutation and skips to its position.

**Averaging.** The loss of a step is the mean over every counted target of the whole step (all
micro-batches, all ranks): each micro-batch's mean loss is weighted by its target count
(``count_targets``: causal-LM labels other than -100 after the shift, else rows), so 2
processes x batch b, 1 process x accumulation 2 x batch b and 1 process x batch 2b take the
same step, padding included.

Dropout draws from torch's global generator, seeded at the start with ``seed + rank`` and saved
in every checkpoint, so a resumed run ends with the weights of one that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from flagopt import settings
from flagopt.errors import (CheckpointSaveError, MissingWeightsError, NonFiniteLossError,
                            TrainerConfigError)
from flagopt.train.checkpoint import (TRAINABLE_FILE, load_checkpoint, resolve_checkpoint,
                                      save_checkpoint, save_tensors)
from flagopt.train.schedule import SCHEDULES, lr_multiplier, warmup_steps

__all__ = ["ENV_TYPES", "Trainer", "count_targets", "save_trainable"]

logger = logging.getLogger(__name__)

ENV_TYPES = ("pytorch", "pytorchDDP")
# FlagAI's other back-ends and options, refused by name rather than ignored.
UNSUPPORTED_ENV_TYPES = ("deepspeed", "deepspeed+mpu", "bmtrain")
UNSUPPORTED_OPTIONS = ("deepspeed_config", "deepspeed_activation_checkpointing",
                       "model_parallel_size", "hostfile", "num_nodes", "num_gpus",
                       "training_script", "tensorboard", "tensorboard_dir", "wandb",
                       "load_type", "optimizer_type")
IGNORE_INDEX = -100

MetricFn = Callable[[nn.Module, Any], dict]
ExportFn = Callable[[nn.Module, Path], None]


@dataclass
class Position:
    """Where the run is: optimizer steps taken, and the epoch / step within it to do next."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


class Trainer:
    """Fine-tune a model with AdamW on one process or under ``torchrun`` (FlagAI's names).

    Args:
        env_type: ``"pytorch"`` (one process) or ``"pytorchDDP"`` (DistributedDataParallel
            under ``torchrun``: NCCL on CUDA, gloo on CPU; rank 0 logs and saves).
        epochs: passes over the training set (ignored when ``max_steps`` is set).
        max_steps: optimizer steps to take; overrides ``epochs``.
        batch_size: examples per micro-batch per process.
        lr, weight_decay: AdamW's; decay applies to matrices, not to biases or LayerNorms.
        warm_up: linear warm-up length: a fraction ``< 1`` of the total steps, or a whole
            number of steps ``>= 1``.
        lr_scheduler: ``"cosine"`` or ``"linear"`` decay to 0 after the warm-up.
        clip_grad: max global gradient norm; 0 or None: no clipping.
        gradient_accumulation_steps: micro-batches per optimizer step.
        save_dir: where ``metrics.jsonl``, ``checkpoint-{step}`` and the export go.
        save_interval, eval_interval, log_interval: every how many steps (None/0: never;
            evaluation also runs at the end).
        seed: data order (``seed + epoch``) and dropout (``seed + rank``).
        fp16: fp16 autocast with a gradient scaler (CUDA only); bf16: bf16 autocast.
        gradient_checkpointing: recompute each decoder layer in backward (less memory).
            FlagAI's ``checkpoint_activations`` is the same switch.
        load_dir: resume from this checkpoint directory, or from the one a save_dir's
            ``latest`` names.
        num_workers: DataLoader worker processes.
        num_checkpoints: how many checkpoints to keep (FlagAI's name).
        device: where to train; None: ``cuda:LOCAL_RANK`` under DDP with CUDA, else where
            the model's parameters are.
        progress: show a tqdm bar; None: on rank 0 when stderr is a terminal.
    Raises:
        TrainerConfigError: a bad value (named, with what was expected), or a FlagAI option
            or back-end flagopt does not support.
    """

    def __init__(self, env_type: str = "pytorch", epochs: int = 1, max_steps: int | None = None,
                 batch_size: int = 1, lr: float = 1e-4, weight_decay: float = 0.0,
                 warm_up: float = 0.0, lr_scheduler: str = "cosine",
                 clip_grad: float | None = 1.0, gradient_accumulation_steps: int = 1,
                 save_dir: str | os.PathLike | None = None, save_interval: int | None = None,
                 eval_interval: int | None = None, log_interval: int | None = 10,
                 seed: int = 1234, fp16: bool = False, bf16: bool = False,
                 gradient_checkpointing: bool = False,
                 load_dir: str | os.PathLike | None = None, num_workers: int = 0,
                 num_checkpoints: int = 2, device: str | torch.device | None = None,
                 progress: bool | None = None, checkpoint_activations: bool = False,
                 **flagai_options: Any) -> None:
        _refuse_unsupported(env_type, flagai_options)
        _check_int("epochs", epochs, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("gradient_accumulation_steps", gradient_accumulation_steps, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("num_checkpoints", num_checkpoints, 1)
        _check_int("seed", seed, 0)
        for name, value in (("max_steps", max_steps), ("save_interval", save_interval),
                            ("eval_interval", eval_interval), ("log_interval", log_interval)):
            if value is not None:
                _check_int(name, value, 0 if name != "max_steps" else 1)
        for name, value, low in (("lr", lr, 0.0), ("weight_decay", weight_decay, 0.0),
                                 ("clip_grad", clip_grad or 0.0, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < low:
                raise TrainerConfigError(f"{name}={value!r}; expected a finite number >= {low}")
        if lr_scheduler not in SCHEDULES:
            raise TrainerConfigError(f"lr_scheduler={lr_scheduler!r}; expected one of "
                                     f"{SCHEDULES}")
        warmup_steps(warm_up, 1)  # validates
        if fp16 and bf16:
            raise TrainerConfigError("fp16=True and bf16=True; choose one autocast dtype")
        if save_interval and save_dir is None:
            raise TrainerConfigError(f"save_interval={save_interval} needs a save_dir to "
                                     f"write checkpoints to")
        self.env_type = env_type
        self.epochs = epochs
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.warm_up = warm_up
        self.lr_scheduler = lr_scheduler
        self.clip_grad = float(clip_grad or 0.0)
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.save_interval = save_interval or 0
        self.eval_interval = eval_interval or 0
        self.log_interval = log_interval or 0
        self.seed = seed
        self.fp16 = fp16
        self.bf16 = bf16
        self.gradient_checkpointing = gradient_checkpointing or checkpoint_activations
        self.load_dir = None if load_dir is None else Path(load_dir)
        self.num_workers = num_workers
        self.num_checkpoints = num_checkpoints
        self.device = None if device is None else torch.device(device)
        self.progress = progress

    # --- the run ---------------------------------------------------------------------------

    def train(self, model: nn.Module, train_dataset: Sequence, valid_dataset: Sequence | None
              = None, collate_fn: Callable[[list], dict] | None = None,
              metric_fn: MetricFn | None = None, export_fn: ExportFn | None = None
              ) -> dict[str, Any]:
        """Train ``model`` in place and export it; returns a summary.

        Args:
            model: ``forward(**batch)`` returns an output with ``loss``.
            train_dataset, valid_dataset: map-style datasets (``len`` and ``[i]``).
            collate_fn: list of examples -> batch dict (default: torch's default collate).
            metric_fn: ``(model, valid_dataset) -> {name: value}``, run on rank 0 at each
                evaluation; its values are reported as ``eval_{name}``.
            export_fn: ``(model, directory)`` writes what was trained into ``save_dir`` at the
                end (rank 0); default ``save_trainable`` (``trainable.safetensors``).
        Returns:
            ``{"step", "epoch", "loss", "eval_loss", "eval_*", "tokens", "checkpoint",
            "export_dir"}`` (eval keys only with a ``valid_dataset``).
        Raises:
            NonFiniteLossError: the loss became NaN/inf (the step is named; not saved).
            CheckpointSaveError: a checkpoint could not be written.
        """
        group = _ProcessGroup.start(self.env_type, self.device)
        try:
            return self._run(group, model, train_dataset, valid_dataset, collate_fn,
                             metric_fn, export_fn or save_trainable)
        finally:
            group.close()

    def _run(self, group: "_ProcessGroup", model: nn.Module, train_dataset: Sequence,
             valid_dataset: Sequence | None, collate_fn: Callable | None,
             metric_fn: MetricFn | None, export_fn: ExportFn) -> dict[str, Any]:
        device = group.device or self.device or _model_device(model)
        if self.fp16 and device.type != "cuda":
            raise TrainerConfigError(f"fp16=True needs a CUDA device, got {str(device)!r}; "
                                     f"use bf16=True on CPU")
        _seed_everything(self.seed + group.rank)
        model.to(device).train()
        if self.gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise TrainerConfigError("the model has no parameter with requires_grad=True: "
                                     "nothing to train")
        step_batch = self.batch_size * group.world_size * self.gradient_accumulation_steps
        steps_per_epoch = len(train_dataset) // step_batch
        if steps_per_epoch == 0:
            raise TrainerConfigError(
                f"train_dataset has {len(train_dataset)} examples, fewer than one optimizer "
                f"step takes (batch_size {self.batch_size} x {group.world_size} processes x "
                f"gradient_accumulation_steps {self.gradient_accumulation_steps} = "
                f"{step_batch})")
        total = self.max_steps or self.epochs * steps_per_epoch
        wrapped = group.wrap(model, device)
        optimizer = _adamw(model, self.lr, self.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(
            self.lr_scheduler, warmup_steps(self.warm_up, total), total))
        scaler = torch.amp.GradScaler(device.type, enabled=self.fp16)
        position = Position()
        if self.load_dir is not None:
            position = self._resume(model, optimizer, scheduler, scaler, step_batch)
        autocast = self._autocast(device)
        log = _Log(self.save_dir if group.is_main else None)
        bar = _progress_bar(total, position.step, self.progress, group.is_main)
        summary: dict[str, Any] = {"checkpoint": None, "tokens": 0, "loss": None}
        window_tokens, window_start = 0, time.perf_counter()
        batches = self._batches(train_dataset, collate_fn, position, steps_per_epoch,
                                group.rank, group.world_size)
        while position.step < total:
            micro = [_to_device(next(batches), device)
                     for _ in range(self.gradient_accumulation_steps)]
            loss, tokens = self._step(wrapped, micro, group, autocast, scaler, position.step)
            lr = scheduler.get_last_lr()[0]
            self._update(params, optimizer, scheduler, scaler)
            position.step += 1
            position.step_in_epoch += 1
            if position.step_in_epoch == steps_per_epoch:
                position.epoch, position.step_in_epoch = position.epoch + 1, 0
            summary["loss"] = loss
            summary["tokens"] += tokens
            window_tokens += tokens
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{window_tokens / max(time.perf_counter() - window_start, 1e-9):.0f}")
            if self.log_interval and position.step % self.log_interval == 0:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                log.write(step=position.step, epoch=position.epoch, loss=loss, lr=lr,
                          tokens_per_s=window_tokens / elapsed)
                window_tokens, window_start = 0, time.perf_counter()
            last = position.step == total
            if valid_dataset is not None and (last or (
                    self.eval_interval and position.step % self.eval_interval == 0)):
                scores = self._evaluate(model, valid_dataset, collate_fn, metric_fn, group,
                                        autocast, device)
                log.write(step=position.step, epoch=position.epoch, **scores)
                summary.update(scores)
            if self.save_interval and position.step % self.save_interval == 0:
                summary["checkpoint"] = self._save(group, model, optimizer, scheduler, scaler,
                                                   position, step_batch)
        bar.close()
        summary.update(step=position.step, epoch=position.epoch, export_dir=None)
        if self.save_dir is not None:
            if group.is_main:
                self.save_dir.mkdir(parents=True, exist_ok=True)
                export_fn(model, self.save_dir)
            group.barrier()
            summary["export_dir"] = str(self.save_dir)
        return summary

    def _step(self, model: nn.Module, micro: list[dict], group: "_ProcessGroup",
              autocast: Callable[[], contextlib.AbstractContextManager],
              scaler: torch.amp.GradScaler, step: int) -> tuple[float, int]:
        """Forward and backward over one step's micro-batches; returns (global mean loss,
        global tokens). Gradients hold d(mean over every target of the step)/d(param)."""
        counts = [count_targets(b) for b in micro]
        local = torch.tensor([float(sum(counts)), 0.0, float(sum(map(_tokens, micro)))],
                             dtype=torch.float64, device=_model_device(model))
        total_targets = group.all_reduce(local.clone())[0].item()
        scale = group.world_size / max(total_targets, 1.0)  # DDP averages grads over ranks
        for j, (batch, count) in enumerate(zip(micro, counts)):
            sync = j == len(micro) - 1
            with group.no_sync(model, sync), autocast():
                loss = model(**batch)["loss"].float()
            scaler.scale(loss * (count * scale)).backward()
            local[1] += loss.detach().double() * count
        totals = group.all_reduce(local)
        mean = (totals[1] / max(totals[0].item(), 1.0)).item()
        if not math.isfinite(mean):
            raise NonFiniteLossError(f"the training loss is {mean} at step {step + 1}; the "
                                     f"step was not taken and no checkpoint of it was written",
                                     step=step + 1)
        return mean, int(totals[2].item())

    def _update(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler,
                scaler: torch.amp.GradScaler) -> None:
        if self.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    # --- data ------------------------------------------------------------------------------

    def _batches(self, dataset: Sequence, collate_fn: Callable | None, position: Position,
                 steps_per_epoch: int, rank: int, world_size: int) -> Iterator[dict]:
        """This rank's micro-batches from ``position`` on, epoch after epoch."""
        epoch, start = position.epoch, position.step_in_epoch
        while True:
            sampler = list(micro_batch_indices(len(dataset), self.batch_size, world_size,
                                               self.gradient_accumulation_steps, self.seed,
                                               epoch, rank, start, steps_per_epoch))
            # Its own generator: a DataLoader iterator otherwise draws its workers' base seed
            # from the global one, and dropout after a resume would differ.
            loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from loader
            epoch, start = epoch + 1, 0

    # --- evaluation ------------------------------------------------------------------------

    def _evaluate(self, model: nn.Module, dataset: Sequence, collate_fn: Callable | None,
                  metric_fn: MetricFn | None, group: "_ProcessGroup",
                  autocast: Callable[[], contextlib.AbstractContextManager],
                  device: torch.device) -> dict[str, float]:
        """Mean loss over every target of ``dataset`` (each rank a share), plus metric_fn."""
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        chunks = [list(range(i, min(i + self.batch_size, len(dataset))))
                  for i in range(0, len(dataset), self.batch_size)]
        loader = DataLoader(dataset, batch_sampler=chunks[group.rank::group.world_size],
                            collate_fn=collate_fn, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(self.seed))
        with torch.no_grad():
            for batch in loader:
                batch = _to_device(batch, device)
                count = count_targets(batch)
                with autocast():
                    loss = model(**batch)["loss"].float()
                sums += torch.tensor([loss.item() * count, count], dtype=torch.float64,
                                     device=device)
        sums = group.all_reduce(sums)
        scores = {"eval_loss": (sums[0] / max(sums[1].item(), 1.0)).item()}
        if metric_fn is not None and group.is_main:
            scores.update({f"eval_{k}": v for k, v in metric_fn(model, dataset).items()})
        model.train()
        return scores

    # --- checkpoints -----------------------------------------------------------------------

    def _save(self, group: "_ProcessGroup", model: nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: Any, scaler: torch.amp.GradScaler, position: Position,
              step_batch: int) -> str:
        path, error = self.save_dir / f"checkpoint-{position.step}", None
        if group.is_main:
            state = {"position": asdict(position), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "rng": _rng_state(), "step_batch": step_batch, "seed": self.seed}
            try:
                path = save_checkpoint(self.save_dir, position.step, trainable_state(model),
                                       state, keep=self.num_checkpoints)
            except OSError as e:
                error = e
        failed = group.all_reduce(torch.tensor([float(error is not None)],
                                               device=_model_device(model)))
        if error is not None:
            raise error
        if failed.item():
            raise CheckpointSaveError(f"rank 0 could not write checkpoint {path}; see its error")
        return str(path)

    def _resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: torch.amp.GradScaler, step_batch: int) -> Position:
        path = resolve_checkpoint(self.load_dir)
        tensors, state = load_checkpoint(path)
        if (state["step_batch"], state["seed"]) != (step_batch, self.seed):
            raise TrainerConfigError(
                f"checkpoint {path} was written by a run with {state['step_batch']} examples "
                f"per step and seed {state['seed']}; this run has {step_batch} and "
                f"{self.seed}: its data order would differ, so it cannot resume there")
        load_trainable(model, tensors, path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d", path, state["position"]["step"])
        return Position(**state["position"])

    def _autocast(self, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
        dtype = torch.float16 if self.fp16 else torch.bfloat16
        enabled = self.fp16 or self.bf16
        return lambda: torch.autocast(device.type, dtype=dtype, enabled=enabled)


# --- pieces the loop uses ----------------------------------------------------------------------


def micro_batch_indices(n: int, batch_size: int, world_size: int, accumulation: int,
                        seed: int, epoch: int, rank: int, start_step: int, steps: int
                        ) -> Iterator[list[int]]:
    """Rank ``rank``'s micro-batches (lists of indices) of epoch ``epoch`` from optimizer step
    ``start_step`` to ``steps``: the permutation of ``range(n)`` seeded ``seed + epoch``, cut
    into steps of ``batch_size * world_size * accumulation``, each micro-step's global batch
    cut into ``world_size`` slices of ``batch_size``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    global_batch = batch_size * world_size
    for step in range(start_step, steps):
        for j in range(accumulation):
            at = (step * accumulation + j) * global_batch + rank * batch_size
            yield order[at:at + batch_size]


def count_targets(batch: dict) -> int:
    """How many targets a batch's mean loss averages over: causal-LM ``labels`` (B, T) other
    than -100 after the one-position shift, else the number of rows."""
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and not labels.is_floating_point():
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    return int(first.shape[0])


def _tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters with ``requires_grad``, by their ``model.state_dict()`` names."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], source: Any) -> None:
    """Copy ``tensors`` into the model's trainable parameters; the names must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise MissingWeightsError(f"{source} does not match the model's trainable parameters: "
                                  f"missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def save_trainable(model: nn.Module, directory: Path) -> None:
    """The default export: the trainable parameters as ``directory/trainable.safetensors``."""
    save_tensors(Path(directory) / TRAINABLE_FILE, trainable_state(model))


def _adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    found = [m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None),
                                                      bool)]
    if not found:
        raise TrainerConfigError(f"gradient_checkpointing=True, but {type(model).__name__} has "
                                 f"no module with a gradient_checkpointing switch")
    for m in found:
        m.gradient_checkpointing = True


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": pos, "has_gauss": has_gauss, "cached": cached}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainerConfigError(f"{name}={value!r}; expected an integer >= {low}")


def _refuse_unsupported(env_type: str, options: dict[str, Any]) -> None:
    if env_type in UNSUPPORTED_ENV_TYPES:
        raise TrainerConfigError(f"env_type={env_type!r} is a FlagAI back-end flagopt does not "
                                 f"support; expected one of {ENV_TYPES}")
    if env_type not in ENV_TYPES:
        raise TrainerConfigError(f"env_type={env_type!r}; expected one of {ENV_TYPES}")
    refused = sorted(k for k in options if k in UNSUPPORTED_OPTIONS)
    if refused:
        raise TrainerConfigError(f"FlagAI Trainer option(s) {refused} are not supported by "
                                 f"flagopt's Trainer")
    if options:
        raise TypeError(f"Trainer got unexpected keyword argument(s) {sorted(options)}")


class _Log:
    """``metrics.jsonl``: one JSON object a line, appended (rank 0 only; None: no file)."""

    def __init__(self, save_dir: Path | None) -> None:
        self.path = None if save_dir is None else save_dir / "metrics.jsonl"
        if self.path is not None:
            save_dir.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        logger.info("%s", record)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _progress_bar(total: int, initial: int, progress: bool | None, is_main: bool) -> Any:
    from tqdm.auto import tqdm
    show = progress if progress is not None else (
        sys.stderr.isatty() and not settings.get().disable_progress)
    return tqdm(total=total, initial=initial, disable=not (show and is_main), desc="train",
                unit="step")


class _ProcessGroup:
    """One process (``world_size`` 1) or torch.distributed's group under ``torchrun``."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 owned: bool = False) -> None:
        self.rank, self.world_size, self.device, self.owned = rank, world_size, device, owned
        self.is_main = rank == 0
        self.distributed = world_size > 1 or owned or dist.is_initialized()

    @classmethod
    def start(cls, env_type: str, device: torch.device | None) -> "_ProcessGroup":
        if env_type == "pytorch":
            return cls()
        env = settings.get()
        local_rank = _env_int("LOCAL_RANK", env.local_rank, 0)
        if device is None and torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
        owned = not dist.is_initialized()
        if owned:
            for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size)):
                if value is None:
                    raise TrainerConfigError(f"env_type='pytorchDDP' needs {name} in the "
                                             f"environment: launch with torchrun")
                _env_int(name, value, 0)
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device is not None and device.type == "cuda"
                                    else "gloo", init_method="env://")
        return cls(dist.get_rank(), dist.get_world_size(), device, owned)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.distributed:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        if sync or not isinstance(model, DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, value: str | None, default: int) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise TrainerConfigError(f"{name}={value!r} in the environment; expected an integer "
                                 f">= 0 (torchrun sets it)")
    return number
