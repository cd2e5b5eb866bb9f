"""Training: stages as data, one loop for every stage and architecture, exact-resume checkpoints.

- `stages`: `Stage` (learning rate per module group, 0 = frozen; weight decay; warmup; clipping) and the
  built-ins `align`, `sft`, `full` (`get_stage`).
- `loop`: `train(model, batches, stage, steps, ...)`, AdamW + warmup/cosine + clipping + accumulation,
  optional bf16 autocast and activation checkpointing; restoring a run and taking a step are its functions.
- `batches`: `ShuffledBatches`, the seeded, resumable data order (sharded per rank under torchrun).
- `runlog`: the metrics CSV, the loss-curve PNG and the progress display of a run.
- `checkpoint`: atomic checkpoints (weights, optimizer, schedule, RNG, data position) without pickle.
- `distributed`: data-parallel training under torchrun (DDP, gloo on CPU), rank 0 writing the files.
- `run`: `vlmkit train`, a dataset file + a model directory or small preset -> a run folder.

    stage = get_stage("align")
    batches = ShuffledBatches(examples, batch_size=16, pad_id=tok.pad_id, seed=0)
    result = train(model, batches, stage, steps=1000, out_dir="runs/align", save_every=200)
    train(model, batches, stage, steps=1000, out_dir="runs/align", resume=latest_checkpoint("runs/align"))
"""
