"""One training harness for both trainers.

`loop.fit(cfg, task)` runs any `Task`: a `build()` that returns the parts (loader, EMA,
checkpointer, optimizers, export) and a `train_step()` for one optimizer step. The loop
owns what the two trainers share: cadence in samples seen, preemption, the NaN guard, one
log reduction into stats.jsonl/wandb, checkpoints (`checkpointer.Checkpointer`: the
DeepSpeed engine or plain torch states, one folder layout), sample grids and the export.
`autoencoder.py` and `t2i.py` are the two tasks.
"""
