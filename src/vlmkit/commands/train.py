"""`vlmkit train`: train a model on a LLaVA JSON/JSONL dataset, one stage at a time (train/run.py); under
torchrun each process trains on its slice of every batch.

    torchrun --nproc_per_node 2 -m vlmkit.cli train --model tiny-random --data synth/data.json --out run
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from vlmkit.commands.common import add_data_flags, add_device_flag
from vlmkit.devices import distributed_backend, resolve_device
from vlmkit.train.distributed import init_distributed, shutdown
from vlmkit.train.qlora import QUANTIZE_CHOICES
from vlmkit.train.run import FRESH_PRESETS, RUN_FILE, SKIPPED_FILE, RunConfig, run_training
from vlmkit.train.stages import STAGES


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `train`."""
    p = sub.add_parser("train", help="train a model on a LLaVA JSON/JSONL dataset, one stage at a time",
                       description="Train a model directory, or a small preset from random weights, on a LLaVA "
                                   "JSON/JSONL dataset with one stage (which parts train, at which learning rate). "
                                   f"Writes OUT/{RUN_FILE}, metrics.csv, loss.png, step-NNNNNN/ checkpoints and the "
                                   "final model (vlmkit generate/chat/serve --model OUT loads it). Under torchrun "
                                   "each process trains on its slice of every batch (DDP, gloo on CPU, NCCL on "
                                   "CUDA); with --fsdp each also holds only its shard of the model.")
    p.add_argument("--model", required=True,
                   help=f"a model directory or Hugging Face hub id (owner/name[@revision]) to fine-tune, or a preset "
                        f"to train from random weights: "
                        f"{', '.join(FRESH_PRESETS)}")
    p.add_argument("--data", required=True, metavar="DATA.json", help="the dataset file (LLaVA JSON or JSONL)")
    add_data_flags(p, f"writes them to OUT/{SKIPPED_FILE}")
    p.add_argument("--out", required=True, metavar="DIR", help="the run folder (created if missing)")
    p.add_argument("--stage", default="sft", metavar="STAGE",
                   help="what trains: a stage of the model preset's recipe by name (e.g. align for llava-1.5-small, "
                        "vision-pretrain for qwen2-vl-small; `vlmkit presets` lists them) or recipe:N for its N-th "
                        "stage; PRESET:NAME or PRESET:N for a stage of any preset's recipe; or a built-in stage: "
                        + "; ".join(f"{n}: {s.description}" for n, s in sorted(STAGES.items()))
                        + ". A recipe stage wins over a built-in of the same name (default sft)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of every group the stage trains "
                                                          "(default: the stage's)")
    p.add_argument("--group-lr", action="append", default=[], metavar="GROUP=LR",
                   help="learning rate of one group (vision, projector, lm, ...), 0 freezes it (repeatable)")
    p.add_argument("--lora", default=None, metavar="SPEC",
                   help="train LoRA adapters instead of the weights of the groups they are in: r=RANK,alpha=A,"
                        "dropout=P,targets=T1,T2,... with targets GROUP (all its linear layers), GROUP.attn or "
                        "GROUP.mlp, e.g. r=16,alpha=32,dropout=0.05,targets=lm.attn,lm.mlp (defaults r=16, alpha=32, "
                        "dropout=0, targets=lm.attn,lm.mlp). Groups without adapters train as the stage says. The "
                        "run folder holds the base model + adapters; vlmkit export OUT --merge folds them in")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the weights, gradients and optimizer states over the processes "
                        "(PyTorch FSDP2, one unit per decoder and vision layer) instead of a full copy in each; "
                        "with --bf16 the weights are gathered in bfloat16 and gradients reduced in float32. "
                        "Checkpoints are torch.distributed.checkpoint shards; the final model is one ordinary "
                        "model folder. Needs torchrun with 2 or more processes")
    # Training's --quantize says how the frozen base is stored while adapters train (nf4: QLoRA); the verbs that
    # only run a model take commands/common.py's inference formats (int8, int4: vlmkit/quantize.py).
    p.add_argument("--quantize", default=None, choices=list(QUANTIZE_CHOICES),
                   help="store the frozen linear weights in 4-bit NormalFloat with double quantization and train "
                        "the rest (QLoRA with --lora; needs torchao: pip install 'vlmkit[qlora]'). The run folder "
                        "holds the dequantized base model")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="samples per micro-batch over all processes (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--warmup", type=int, default=None, metavar="STEPS",
                   help="linear warmup steps before the cosine decay (default: 3%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: the stage's)")
    p.add_argument("--grad-clip", type=float, default=None, help="max gradient norm, 0 = off (default: the stage's)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute layer activations in the backward pass (less memory, more time)")
    p.add_argument("--pack", type=int, default=None, metavar="LEN",
                   help="pack each batch's samples into rows of at most LEN tokens instead of padding")
    p.add_argument("--max-len", type=int, default=None, metavar="TOKENS",
                   help="refuse samples longer than this, images included (default: the model's context)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="write a checkpoint every STEPS steps (default 0: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=0, metavar="N",
                   help="keep only the N newest checkpoints (default 0: keep all)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue the run in --out from its newest checkpoint (or the step-NNNNNN/ given); "
                        "the result equals an uninterrupted run's")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights of a fresh preset, the data order and "
                                                       "the RNGs (default 0)")
    p.add_argument("--log-every", type=int, default=10, metavar="STEPS",
                   help="rewrite metrics.csv every STEPS steps (default 10; also at each checkpoint)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="DataLoader worker processes that read and plan the images of the next batches while the "
                        "model trains (default 0: in the training process); the batches, their order and the "
                        "result are the same with any N")
    p.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="also write metrics.csv's rows as TensorBoard scalars to DIR (default OUT/tensorboard); "
                        "needs pip install tensorboard")
    add_device_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="end with one JSON object: steps, losses, paths")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    group_lrs = {}
    for item in args.group_lr:
        name, sep, value = item.partition("=")
        try:
            group_lrs[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--group-lr {item!r} is not GROUP=LR, e.g. --group-lr vision=1e-4") from None
        if not sep or not name.strip():
            raise ValueError(f"--group-lr {item!r} is not GROUP=LR, e.g. --group-lr vision=1e-4")
    cfg = RunConfig(model=args.model, data=args.data, out=args.out, stage=args.stage, steps=args.steps,
                    batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, group_lrs=group_lrs,
                    warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip, bf16=args.bf16,
                    activation_checkpointing=args.activation_checkpointing, checkpoint_every=args.checkpoint_every,
                    keep_checkpoints=args.keep_checkpoints, resume=args.resume, seed=args.seed,
                    data_policy=args.data_policy, image_root=args.image_root, max_len=args.max_len,
                    pack_len=args.pack, log_every=args.log_every, progress=not (args.quiet or args.json),
                    threads=args.threads, workers=args.workers, device=args.device, lora=args.lora,
                    fsdp=args.fsdp, quantize=args.quantize, tensorboard=(args.tensorboard or str(Path(args.out) / "tensorboard")
                                                 if args.tensorboard is not None else None))
    # gloo on the CPU, NCCL for CUDA tensors (a bad --device fails here, before the process group); a GPU
    # process makes its own GPU the current one first, so NCCL's collectives run there
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.index is not None:
        torch.accelerator.set_device_index(device.index)
    world = init_distributed(distributed_backend(device))
    try:
        result = run_training(cfg, world)
    except BaseException:
        shutdown(wait=False)
        raise
    shutdown()
    if world.is_main:
        losses = result.train.losses
        summary = {"out": str(result.out), "model": str(result.model_dir), "samples": result.num_samples,
                   "skipped": len(result.skipped), "steps": result.train.steps, "losses": losses,
                   "processes": world.size}
        if args.json:
            print(json.dumps(summary))
        elif losses:
            print(f"trained steps {result.train.steps[0]}-{result.train.steps[-1]}: loss {losses[0]:.4f} -> "
                  f"{losses[-1]:.4f}; model saved to {result.model_dir}")
    return 0
