"""Training and evaluation engine. Registering modules are imported here explicitly.

    trainer.py        run(cfg): the whole job in reading order (build, then fit or evaluate only)
    run_settings.py   RunSettings: the runtime keys, read once (defaults: configs/base/runtime.yml)
    loop.py           one training epoch, one evaluation pass
    phases.py         the training phases; build.py: optimizer, schedules, EMA from the config
    optim.py          optimizers with parameter groups, learning-rate schedules
    ema.py            ModelEMA
    checkpointing.py  training state: atomic writes, resume, fine-tuning
    distributed.py    process group set-up, DDP wrapping, reductions (queries in dfine/utils/distributed.py)
    reporting.py      evaluation results to the log, TensorBoard and metrics.json
    visualize.py      the demo picture; logs.py: logging set-up; preflight.py: dataset check before training
"""

from dfine.engine import ema, optim  # noqa: F401  (register ModelEMA; AdamW/SGD/Adam, LinearWarmup, MultiStepLR, FlatCosineLR)
