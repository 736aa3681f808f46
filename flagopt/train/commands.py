"""``flagopt finetune`` (and ``python -m flagopt.finetune`` under ``torchrun``).

A thin layer over the Python API: read the data with the model's tokenizer, build the task
model with ``AutoLoader``, wrap it in LoRA when ``--lora-r`` is given (else train it whole),
train with ``flagopt.Trainer``, and export into ``--output``: a PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) or a model directory in the hub
layout (``config.json`` + ``model.safetensors`` + tokenizer files). Checkpoints
(``checkpoint-N/``) and ``metrics.jsonl`` go to the same directory. Prints one JSON line of the
run's summary on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TASKS = ("lm", "classification", "qa")
_EXAMPLE = ("flagopt finetune --model opt-125m-en --task lm --train notes.txt --valid held_out.txt"
            " --lora-r 16 --lora-alpha 32 --max-steps 500 --batch-size 8 --lr 2e-4 "
            "--output runs/notes")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``finetune`` to the ``flagopt`` command's subparsers."""
    ft = sub.add_parser("finetune", help="fine-tune a model (LoRA or full) on a local data file",
                        description=__doc__.split("\n\n")[0], epilog=f"example: {_EXAMPLE}")
    add_arguments(ft)
    return ft


def add_arguments(ft: argparse.ArgumentParser) -> None:
    """The finetune options (shared by ``flagopt finetune`` and ``python -m flagopt.finetune``)."""
    ft.add_argument("--model", default="opt-125m-en",
                    help="registry name, hub repo id (owner/name[@rev]) or local directory")
    ft.add_argument("--task", choices=TASKS, default="lm")
    ft.add_argument("--train", required=True,
                    help="training data: lm: .txt or .jsonl {'text'}; classification: .jsonl "
                         "{'text', 'label'}; qa: SQuAD .json or .jsonl")
    ft.add_argument("--valid", help="validation data in the same format")
    ft.add_argument("--output", required=True,
                    help="directory for the adapter or model, checkpoints and metrics.jsonl")
    lora = ft.add_argument_group("LoRA (without --lora-r the whole model is trained)")
    lora.add_argument("--lora-r", type=int, help="adapter rank")
    lora.add_argument("--lora-alpha", type=float, help="scaling numerator (default: 2 * r)")
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument("--target-modules", default="q_proj,v_proj",
                      help="comma-separated module names (PEFT's matching)")
    lora.add_argument("--use-rslora", action="store_true", help="scaling alpha / sqrt(r)")
    lora.add_argument("--quantize", choices=("int8",),
                      help="keep the frozen base in int8 (LoRA only): the int8 + LoRA recipe")
    loop = ft.add_argument_group("training")
    loop.add_argument("--epochs", type=int, default=1)
    loop.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    loop.add_argument("--batch-size", type=int, default=8, help="examples per step per process")
    loop.add_argument("--gradient-accumulation-steps", type=int, default=1)
    loop.add_argument("--lr", type=float, default=2e-4)
    loop.add_argument("--weight-decay", type=float, default=0.0)
    loop.add_argument("--warm-up", type=float, default=0.0,
                      help="warm-up: a fraction of the steps (< 1) or a number of steps")
    loop.add_argument("--lr-scheduler", choices=("cosine", "linear"), default="cosine")
    loop.add_argument("--clip-grad", type=float, default=1.0)
    loop.add_argument("--block-size", type=int,
                      help="lm: tokens per block (default min(1024, max positions))")
    loop.add_argument("--max-length", type=int,
                      help="classification/qa: tokens per example at most")
    loop.add_argument("--save-interval", type=int, help="checkpoint every N steps")
    loop.add_argument("--eval-interval", type=int, help="evaluate every N steps (and at the end)")
    loop.add_argument("--log-interval", type=int, default=10)
    loop.add_argument("--keep-checkpoints", type=int, default=2)
    loop.add_argument("--resume", action="store_true",
                      help="continue from the last checkpoint in --output")
    loop.add_argument("--seed", type=int, default=1234)
    precision = loop.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    precision.add_argument("--fp16", action="store_true",
                           help="float16 autocast with a loss scaler (CUDA only)")
    loop.add_argument("--gradient-checkpointing", action="store_true",
                      help="recompute activations in backward (less memory, slower)")
    where = ft.add_argument_group("model")
    where.add_argument("--model-dir", help="where models are stored (default $FLAGOPT_HOME)")
    where.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; "
                                        "under torchrun, cuda:LOCAL_RANK)")
    where.add_argument("--dtype", help="weights' dtype (default float32)")
    where.add_argument("--endpoint", help="hub mirror (default $FLAGOPT_ENDPOINT or the hub)")
    where.add_argument("--offline", action="store_true", help="never use the network")
    where.add_argument("--quiet", action="store_true", help="no progress bars or notices")
    where.add_argument("--debug", action="store_true", help="show the traceback of an error")


def run_finetune(args: argparse.Namespace) -> int:
    """Run one fine-tuning job from parsed arguments; prints the summary as a JSON line
    (rank 0 only under ``torchrun``)."""
    from flagopt import settings

    summary = finetune(**_options(args))
    if (settings.get().rank or "0") == "0":  # under torchrun, one summary: rank 0's
        print(json.dumps(summary, default=str), flush=True)
    return 0


def _options(args: argparse.Namespace) -> dict[str, Any]:
    from flagopt.auto_model.cli_options import loader_options

    loader = loader_options(args)
    lora = None
    if args.lora_r is not None:
        targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
        lora = dict(r=args.lora_r, lora_alpha=2 * args.lora_r if args.lora_alpha is None
                    else args.lora_alpha, lora_dropout=args.lora_dropout,
                    target_modules=targets, use_rslora=args.use_rslora)
    else:
        for flag, value in (("--lora-alpha", args.lora_alpha), ("--quantize", args.quantize),
                            ("--use-rslora", args.use_rslora or None)):
            if value is not None:
                raise ValueError(f"{flag} needs --lora-r (without it the whole model is "
                                 f"trained)")
    trainer = dict(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                   gradient_accumulation_steps=args.gradient_accumulation_steps, lr=args.lr,
                   weight_decay=args.weight_decay, warm_up=args.warm_up,
                   lr_scheduler=args.lr_scheduler, clip_grad=args.clip_grad,
                   save_interval=args.save_interval, eval_interval=args.eval_interval,
                   log_interval=args.log_interval, num_checkpoints=args.keep_checkpoints,
                   seed=args.seed, bf16=args.bf16, fp16=args.fp16,
                   gradient_checkpointing=args.gradient_checkpointing)
    if args.quiet:
        trainer["progress"] = False
    return dict(model=args.model, task=args.task, train=args.train, valid=args.valid,
                output=args.output, lora=lora, quantize=args.quantize, resume=args.resume,
                block_size=args.block_size, max_length=args.max_length, loader=loader,
                trainer=trainer)


def finetune(*, model: str, task: str, train: str, output: str, valid: str | None = None,
             lora: dict | None = None, quantize: str | None = None, resume: bool = False,
             block_size: int | None = None, max_length: int | None = None,
             loader: dict | None = None, trainer: dict | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` on ``task`` and export into ``output``; returns the summary.

    ``lora`` holds ``LoraConfig`` fields (None: full fine-tuning); ``loader`` holds
    ``AutoLoader`` options; ``trainer`` holds ``Trainer`` options. Under ``torchrun``
    (``WORLD_SIZE`` > 1) training is DistributedDataParallel.
    """
    from flagopt import settings
    from flagopt.auto_model import AutoLoader
    from flagopt.model import export
    from flagopt.model.adapters import save_adapter
    from flagopt.model.lora import LoraConfig, apply_lora, trainable_parameters
    from flagopt.train import data as task_data
    from flagopt.train.metrics import evaluate
    from flagopt.train.trainer import Trainer

    if task not in TASKS:
        raise ValueError(f"task={task!r}; expected one of {', '.join(TASKS)}")
    if quantize is not None and lora is None:
        raise ValueError("quantize='int8' fine-tunes LoRA adapters over an int8 base; give "
                         "lora= (--lora-r): int8 weights themselves cannot be trained")
    for name, path in (("train", train), ("valid", valid)):  # before any download
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"--{name} file not found: {path}")
    output_dir = Path(output)
    if not resume and (output_dir / "latest").exists():
        raise FileExistsError(f"{output_dir} already holds a run (its 'latest' checkpoint); "
                              f"pass --resume to continue it, or choose another --output")
    lora_config = LoraConfig(**lora) if lora is not None else None  # validated before loading
    world = int(settings.get().world_size or 1)
    options = dict(loader or {})
    label2id = None
    if task == "classification":
        label2id = task_data.label_mapping(train)
        options["num_labels"] = len(label2id)
    import torch

    torch.manual_seed((trainer or {}).get("seed", 1234))  # a fresh task head starts the same
    auto = AutoLoader(task, model, quantize=quantize, **options)
    net, tokenizer = auto.get_model(), auto.get_tokenizer()
    positions = net.config.max_position_embeddings
    train_set = task_data.load_task_data(task, train, tokenizer, block_size=block_size,
                                         max_length=max_length, label2id=label2id,
                                         max_positions=positions)
    valid_set = None
    if valid is not None:
        valid_set = task_data.load_task_data(task, valid, tokenizer, block_size=block_size,
                                             max_length=max_length, label2id=label2id,
                                             max_positions=positions)
    config_updates: dict[str, Any] = {}
    if label2id is not None:
        config_updates = {"id2label": {str(i): name for name, i in label2id.items()},
                          "label2id": dict(label2id)}
    if lora_config is not None:
        lora_config = apply_lora(net, _with_base(lora_config, model))
    else:
        for p in net.parameters():
            p.requires_grad_(True)
    logger.info("training %s of %s parameters", f"{trainable_parameters(net):,}",
                f"{sum(p.numel() for p in net.parameters()):,}")

    def export_fn(trained, directory: Path) -> None:
        if lora_config is not None:
            save_adapter(directory, trained, lora_config)
            export.copy_tokenizer_files(auto.local_dir, directory) \
                if (auto.local_dir / "vocab.json").is_file() else None
        else:
            export.save_pretrained(trained, directory, config_updates=config_updates,
                                   tokenizer_dir=auto.local_dir
                                   if (auto.local_dir / "vocab.json").is_file() else None)

    batch = (trainer or {}).get("batch_size", 8)

    def metric_fn(trained, dataset) -> dict[str, float]:
        scores = evaluate(task, trained, dataset, dataset.collate, batch)
        scores.pop("eval_loss", None)  # the trainer reports its own eval_loss
        return scores

    run = Trainer(env_type="pytorchDDP" if world > 1 else "pytorch", save_dir=output_dir,
                  load_dir=output_dir if resume else None, **(trainer or {}))
    summary = run.train(net, train_dataset=train_set, valid_dataset=valid_set,
                        collate_fn=train_set.collate,
                        metric_fn=metric_fn if valid_set is not None else None,
                        export_fn=export_fn)
    summary.update(task=task, model=str(model), output=str(output_dir),
                   mode="lora" if lora_config is not None else "full",
                   trainable_parameters=trainable_parameters(net))
    return summary


def _with_base(config, model: str):
    """The LoRA config with the base model's name recorded (PEFT writes it too)."""
    import dataclasses

    return dataclasses.replace(config, base_model_name_or_path=str(model))

