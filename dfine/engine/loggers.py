"""Experiment loggers: TensorBoard, Weights & Biases and MLflow behind one SummaryWriter-like object.

Config (rank 0 only; default ``[tensorboard]``)::

    loggers: [tensorboard, wandb, mlflow]
    loggers: [tensorboard, {wandb: {project: my-detector, mode: offline}}, {mlflow: {tracking_uri: 'file:./mlruns'}}]

A mapping passes its options on: wandb's go to ``wandb.init`` (defaults: project ``dfine``, the run named after
output_dir, files under output_dir, the resolved config); mlflow takes ``tracking_uri`` and ``experiment``
(default ``dfine``), everything else becomes a tag. The training code writes through ``add_scalar`` and every
logger receives the same (tag, value, step): ``Loss/total``, ``Loss/<term>``, ``Lr/pg_<i>`` per optimizer step,
``Test/<stat>`` and ``Test/per_class_AP/<name>`` per epoch. Images and figures go to TensorBoard only.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from dfine.config import config_to_yaml
from dfine.registry import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

KNOWN = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # logger -> package it needs
PIP_NAMES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


def parse_loggers(cfg: dict) -> list[tuple[str, dict]]:
    """``loggers`` as [(name, options)]; ConfigError naming the entry when unknown or malformed. Packages are
    not imported here (see ``check_installed``)."""
    entries = cfg.get("loggers")
    if entries is None:
        return [("tensorboard", {})]
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list):
        raise ConfigError(f"`loggers` must be a list such as [tensorboard, wandb, mlflow], not {entries!r}")
    parsed = []
    for entry in entries:
        if isinstance(entry, dict) and len(entry) == 1:
            (name, options), = entry.items()
            options = options or {}
        else:
            name, options = entry, {}
        if not isinstance(name, str) or name not in KNOWN:
            raise ConfigError(f"`loggers`: unknown logger {name!r}{did_you_mean(str(name), KNOWN)} (known: {', '.join(KNOWN)})")
        if not isinstance(options, dict):
            raise ConfigError(f"`loggers`: the options of {name} must be a mapping, not {options!r}")
        if name in (n for n, _ in parsed):
            raise ConfigError(f"`loggers` lists {name} twice")
        parsed.append((name, dict(options)))
    return parsed


def check_installed(loggers: list[tuple[str, dict]]) -> None:
    """ConfigError naming the missing package of the first configured logger that cannot be imported."""
    for name, _ in loggers:
        if importlib.util.find_spec(KNOWN[name]) is None:
            raise ConfigError(
                f"`loggers` lists {name} but the `{PIP_NAMES[name]}` package is not installed: "
                f"pip install {PIP_NAMES[name]} (or pip install -e '.[loggers]'), or remove it from `loggers`"
            )


class ExperimentLoggers:
    """Fans SummaryWriter calls out to the configured loggers. Scalars go to all; anything else (add_image,
    add_figure, add_text, ...) to TensorBoard only, and is a no-op without it."""

    def __init__(self, cfg: dict, output_dir: Path, resume: bool = False, loggers: list[tuple[str, dict]] | None = None):
        loggers = parse_loggers(cfg) if loggers is None else loggers
        check_installed(loggers)
        self.tensorboard = None
        self.backends: list = []
        for name, options in loggers:
            if name == "tensorboard":
                self.tensorboard = tensorboard_writer(cfg, output_dir)
            elif name == "wandb":
                self.backends.append(WandbBackend(cfg, output_dir, options, resume))
            elif name == "mlflow":
                self.backends.append(MlflowBackend(cfg, output_dir, options))
        logger.info("experiment loggers: %s", ", ".join(name for name, _ in loggers) or "(none)")

    def add_scalar(self, tag: str, value, step: int) -> None:
        value = float(value)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)
        for backend in self.backends:
            backend.log(tag, value, int(step))

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        for backend in self.backends:
            backend.close()

    def __getattr__(self, name):
        # add_image, add_figure, add_text, ...: TensorBoard's, or nothing
        tensorboard = self.__dict__.get("tensorboard")
        if tensorboard is not None:
            return getattr(tensorboard, name)
        if name.startswith("add_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def tensorboard_writer(cfg: dict, output_dir: Path):
    """A SummaryWriter in ``summary_dir`` (default: output_dir/summary) that starts with the config as text."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(cfg.get("summary_dir") or Path(output_dir) / "summary"))
    writer.add_text("config", "```\n" + config_to_yaml(cfg) + "\n```", 0)
    return writer


class WandbBackend:
    """One wandb run per output_dir: its id is kept in output_dir/wandb/run_id, so a resumed training continues
    the same run. Scalars are logged with the training's step (wandb wants steps that never decrease; the
    per-step ``Loss/*``, ``Lr/*`` are plotted against ``global_step``, the per-epoch ``Test/*`` against ``epoch``)."""

    def __init__(self, cfg: dict, output_dir: Path, options: dict, resume: bool):
        import wandb

        self.wandb = wandb
        folder = Path(output_dir) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        kwargs = {"project": "dfine", "name": Path(output_dir).name, "dir": str(output_dir), "config": cfg, **options}
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        self.run = wandb.init(**kwargs)
        for step_metric, pattern in (("global_step", "Loss/*"), ("global_step", "Lr/*"), ("epoch", "Test/*")):
            self.run.define_metric(step_metric)
            self.run.define_metric(pattern, step_metric=step_metric)
        id_file.write_text(str(self.run.id))

    def log(self, tag: str, value: float, step: int) -> None:
        if tag.startswith("Test/"):
            self.run.log({tag: value, "epoch": step})
        else:
            self.run.log({tag: value, "global_step": step})

    def close(self) -> None:
        self.run.finish()


class MlflowBackend:
    def __init__(self, cfg: dict, output_dir: Path, options: dict):
        import mlflow

        self.mlflow = mlflow
        options = dict(options)
        if "tracking_uri" in options:
            mlflow.set_tracking_uri(str(options.pop("tracking_uri")))
        mlflow.set_experiment(str(options.pop("experiment", "dfine")))
        self.run = mlflow.start_run(run_name=str(options.pop("run_name", Path(output_dir).name)))
        mlflow.set_tags({"output_dir": str(output_dir), **{k: str(v) for k, v in options.items()}})
        mlflow.log_text(config_to_yaml(cfg), "config.yml")

    def log(self, tag: str, value: float, step: int) -> None:
        self.mlflow.log_metric(tag, value, step=step)

    def close(self) -> None:
        self.mlflow.end_run()
