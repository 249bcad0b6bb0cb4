"""The everyday workflow: the `dfine` command, results.csv / results.png, early stopping, the time budget,
`-r auto` and the experiment loggers. Trainings use the tiny stand-in detector of test_engine_trainer on the
synthetic data (a few seconds each)."""

from __future__ import annotations

import csv
import json
import logging
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import dfine.engine.trainer as trainer
from dfine.cli.__main__ import COMMANDS
from dfine.cli.__main__ import main as dfine_main
from dfine.engine.checkpointing import resolve_resume
from dfine.engine.early_stopping import EarlyStopping, TimeBudget
from dfine.engine.loggers import ExperimentLoggers
from dfine.engine.phases import MAIN, NO_AUG
from dfine.evaluation import STAT_NAMES
from helpers import DEMO_CONFIG, run_killed_at_epoch_1
from test_engine_trainer import tiny_config  # registers the tiny detector's components

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def synthetic_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DFINE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.set_num_threads(1)


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


# ---------------------------------------------------------------- the dfine command


def test_dfine_command_lists_and_dispatches_every_program(capsys):
    out = subprocess.run([sys.executable, "-m", "dfine.cli", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0
    listed = re.findall(r"^  (\S+)  ", out.stdout, flags=re.M)
    assert listed == ["train", "eval", "predict", "export", "convert", "check-data", "benchmark"]
    # each command is the main(argv) of its dfine/cli module (the same program as tools/<module>.py)
    for name, (module, _) in COMMANDS.items():
        assert (REPO / "dfine" / "cli" / f"{module}.py").is_file() and (REPO / "tools" / f"{module}.py").is_file(), name
    # setup.py installs it as the `dfine` console script
    assert re.search(r"""["']dfine\s*=\s*dfine\.cli\.__main__:main["']""", (REPO / "setup.py").read_text())

    assert dfine_main(["train", "-c", str(DEMO_CONFIG), "--print-config", "-u", "epochs=2", "stop_epoch=1"]) == 0
    printed = capsys.readouterr().out
    assert "epochs: 2" in printed and "stop_epoch: 1" in printed
    assert dfine_main(["trian"]) == 2
    assert "did you mean `train`" in capsys.readouterr().err


# ---------------------------------------------------------------- results.csv / results.png and -r auto


def test_results_csv_continues_after_kill_and_auto_resume(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "run")
    out = Path(cfg["output_dir"])
    assert resolve_resume("auto", out, cfg) is None  # nothing there yet: a fresh start
    run_killed_at_epoch_1(monkeypatch, trainer, cfg)
    header, rows = read_csv(out / "results.csv")
    assert [r["epoch"] for r in rows] == ["0"]
    # a run killed after writing epoch 1's row but before epoch 1's checkpoint: that row must not be doubled
    with open(out / "results.csv", "a", newline="") as f:
        csv.DictWriter(f, fieldnames=header).writerow({**rows[0], "epoch": "1", "AP": "0.999"})

    resume = resolve_resume("auto", out, cfg)
    assert resume == str(out / "last.pth")
    assert trainer.run(cfg, resume=resume) == 0

    header, rows = read_csv(out / "results.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert [r["phase"] for r in rows] == [MAIN, MAIN, NO_AUG]
    assert header[:4] == ["epoch", "phase", "time", "epoch_time_s"]
    assert {"lr/pg0", "lr/pg1", "train/loss_bbox", "train/loss_vfl", "train/loss", "best", "note"} <= set(header)
    assert [name for name in header if name in STAT_NAMES] == list(STAT_NAMES)
    metrics = json.loads((out / "metrics.json").read_text())
    for row, entry in zip(rows, metrics["epochs"]):
        # the same floats as metrics.json, written with the round-trip repr: exact by construction
        assert [float(row[name]) for name in STAT_NAMES] == [entry["eval"]["stats"][name] for name in STAT_NAMES]
        assert float(row["train/loss"]) == pytest.approx(sum(entry["train"].values()), rel=1e-12)
    best_epoch = metrics["best"]["epoch"]
    assert [r["best"] == "1" for r in rows][best_epoch] and max(float(r["AP"]) for r in rows) == metrics["best"]["ap"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_auto_resume_refuses_another_models_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = torch.nn.Linear(3, 2)
    torch.save({"model": other.state_dict(), "optimizer": {}, "last_epoch": 4}, out / "last.pth")
    code = dfine_main(["train", "-c", str(DEMO_CONFIG), "-r", "auto", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: -r auto:") and str(out / "last.pth") in err and "another model" in err
    torch.save({"model": other.state_dict()}, out / "last.pth")  # weights only: nothing to resume
    assert dfine_main(["train", "-c", str(DEMO_CONFIG), "-r", "auto", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out / "last.pth") in err and "not a training checkpoint" in err


# ---------------------------------------------------------------- early stopping and time budget


def test_early_stopping_counts_evaluations_without_improvement():
    flat = {"AP": 0.5}
    stopper = EarlyStopping(patience=3, min_delta=0.01, metric="AP", even_in_main_phase=True)
    decisions = [stopper.update(e, MAIN, {"AP": ap}, NO_AUG) for e, ap in enumerate([0.5, 0.505, 0.509, 0.52, 0.52, 0.52, 0.52])]
    # 0.505 and 0.509 are within min_delta of 0.5; 0.52 improves; then three flat evaluations stop at epoch 6
    assert [d is not None for d in decisions] == [False] * 6 + [True]
    assert stopper.best_epoch == 3 and "best AP 0.5200 at epoch 3" in decisions[-1]

    # default: no stop in the main phase; the counter starts again in the no-augmentation phase
    stopper = EarlyStopping(patience=2)
    phases = [MAIN] * 4 + [NO_AUG] * 2
    decisions = [stopper.update(e, p, flat, NO_AUG) for e, p in enumerate(phases)]
    assert [d is not None for d in decisions] == [False] * 5 + [True]  # 3 flat main-phase evaluations: no stop

    restored = EarlyStopping(patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored.state_dict() == stopper.state_dict()


def test_time_budget_stops_before_an_epoch_that_would_overrun():
    budget = TimeBudget(hours=1.0, start=0.0)
    assert budget.after_epoch(1000.0, now=1000.0) is None  # 1000 s + next ~1000 s <= 3600 s
    assert budget.after_epoch(1100.0, now=2100.0) is None  # 2100 + 1100 = 3200
    assert budget.after_epoch(900.0, now=3000.0) is not None  # 3000 + 1100 (longest) > 3600


def test_early_stopping_on_a_flat_metric_stops_after_patience_evaluations(tmp_path, caplog):
    # min_delta 1.0: no AP can improve on another by more than 1, so the metric is flat for early stopping
    cfg = tiny_config(tmp_path, "flat", ["epochs=6", "stop_epoch=4", "early_stopping={patience: 2, min_delta: 1.0, even_in_main_phase: true}"])
    out = Path(cfg["output_dir"])
    with caplog.at_level(logging.INFO):
        assert trainer.run(cfg) == 0
    _, rows = read_csv(out / "results.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]  # evaluation 0 sets the best, 1 and 2 exhaust patience 2
    assert rows[-1]["note"].startswith("early stopping at epoch 2") and not rows[0]["note"]
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["last_epoch"] == 2 and last["stopped"]["by"] == "early_stopping"
    assert last["early_stopping"]["best_epoch"] == 0 and last["early_stopping"]["bad_evaluations"] == 2
    assert torch.load(out / "best.pth", weights_only=True)["last_epoch"] == last["best"]["epoch"]
    logged = caplog.text + (out / "train.log").read_text()
    assert "early stopping at epoch 2" in logged and "best AP" in logged
    # the scheduler re-launches the same command: the run is over, nothing is trained
    caplog.clear()
    assert trainer.run(cfg, resume=resolve_resume("auto", out, cfg)) == 0
    assert len(read_csv(out / "results.csv")[1]) == 3 and "stopped early" in caplog.text


def test_time_limit_stops_cleanly_with_a_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "budget", ["time_limit=0.000001"])  # 3.6 ms: any epoch overruns it
    out = Path(cfg["output_dir"])
    assert trainer.run(cfg) == 0
    _, rows = read_csv(out / "results.csv")
    assert [r["epoch"] for r in rows] == ["0"] and rows[0]["note"].startswith("time limit")
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["last_epoch"] == 0 and last["stopped"]["by"] == "time_limit"
    assert (out / "best.pth").is_file()


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("loggers=[tensorboard, tensorbord]", ["`loggers`", "tensorbord", "did you mean `tensorboard`"]),
        ("early_stopping={patience: 0}", ["`early_stopping.patience`", "0"]),
        ("early_stopping={patience: 3, metric: mAP}", ["`early_stopping.metric`", "mAP"]),
        ("time_limit=0", ["time_limit", "0"]),
        ("time_limit=-2", ["time_limit", "-2"]),
    ],
)
def test_bad_workflow_settings_get_one_line(tmp_path, capsys, override, names):
    out = tmp_path / "run"
    code = dfine_main(["train", "-c", str(DEMO_CONFIG), "--output-dir", str(out), "-u", override])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for name in names:
        assert name in err
    assert not (out / "config.yml").exists()  # rejected before anything was written


# ---------------------------------------------------------------- experiment loggers


class _Recorder:
    def __init__(self):
        self.calls = []


def _fake_wandb(record: _Recorder):
    module = types.ModuleType("wandb")

    class Run:
        id = "fake123"

        def define_metric(self, *args, **kwargs):
            pass

        def log(self, data):
            record.calls.append(("wandb", dict(data)))

        def finish(self):
            record.calls.append(("wandb", "finish"))

    module.init = lambda **kwargs: record.calls.append(("wandb.init", kwargs)) or Run()
    module.__spec__ = types.SimpleNamespace(name="wandb")
    return module


def _fake_mlflow(record: _Recorder):
    module = types.ModuleType("mlflow")
    module.set_tracking_uri = lambda uri: record.calls.append(("mlflow.uri", uri))
    module.set_experiment = lambda name: None
    module.start_run = lambda run_name: record.calls.append(("mlflow.run", run_name))
    module.set_tags = lambda tags: None
    module.log_text = lambda text, name: None
    module.log_metric = lambda key, value, step: record.calls.append(("mlflow", key, value, step))
    module.end_run = lambda: record.calls.append(("mlflow", "end"))
    return module


def test_loggers_receive_the_same_scalars(tmp_path, monkeypatch):
    """Adapter test with stand-in modules (the real libraries' local modes are exercised below)."""
    record = _Recorder()
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(record))
    monkeypatch.setitem(sys.modules, "mlflow", _fake_mlflow(record))
    monkeypatch.setattr("dfine.engine.loggers.check_installed", lambda loggers: None)
    cfg = {"loggers": ["wandb", {"mlflow": {"tracking_uri": "file:/x"}}]}
    loggers = ExperimentLoggers(cfg, tmp_path, resume=False)
    loggers.add_scalar("Loss/total", torch.tensor(1.5), 10)
    loggers.add_scalar("Test/AP", 0.25, 3)
    loggers.add_image("ignored", None, 0)  # TensorBoard only: a no-op without it
    loggers.close()
    assert ("mlflow", "Loss/total", 1.5, 10) in record.calls and ("mlflow", "Test/AP", 0.25, 3) in record.calls
    assert ("wandb", {"Loss/total": 1.5, "global_step": 10}) in record.calls
    assert ("wandb", {"Test/AP": 0.25, "epoch": 3}) in record.calls
    assert ("mlflow.uri", "file:/x") in record.calls and ("wandb", "finish") in record.calls
    assert (tmp_path / "wandb" / "run_id").read_text() == "fake123"


def test_missing_logger_package_is_named(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code = dfine_main(["train", "-c", str(DEMO_CONFIG), "--output-dir", str(tmp_path / "run"), "-u", "loggers=[wandb]"])
    err = capsys.readouterr().err
    assert code == 2 and "`wandb` package is not installed" in err and err.count("\n") == 1


def test_real_loggers_in_local_mode_match_metrics_json(tmp_path, monkeypatch):
    """wandb in offline mode and MLflow with a file store, when installed (pip install -e '.[loggers]')."""
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores unless asked
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = (tmp_path / "mlruns").as_uri()
    cfg = tiny_config(tmp_path, "logged", [
        "epochs=2", "stop_epoch=2",
        f"loggers=[tensorboard, {{wandb: {{mode: offline}}}}, {{mlflow: {{tracking_uri: '{uri}', experiment: tiny}}}}]",
    ])
    assert trainer.run(cfg) == 0
    out = Path(cfg["output_dir"])
    metrics = json.loads((out / "metrics.json").read_text())
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "Test/AP"))
    assert history == [(e["epoch"], e["eval"]["stats"]["AP"]) for e in metrics["epochs"]]
    assert (out / "wandb" / "run_id").is_file() and list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_phase_boundaries_and_plot(tmp_path):
    import warnings
    from types import SimpleNamespace

    from dfine.engine.phases import PhaseSchedule
    from dfine.engine.results import phase_boundaries, plot_results

    schedule = PhaseSchedule(epochs=10, stop_epoch=8, warmup_steps=30, steps_per_epoch=20)
    loader = SimpleNamespace(
        dataset=SimpleNamespace(transforms=SimpleNamespace(policy={"name": "stop_epoch", "epoch": 6, "ops": ["Mosaic"]})),
        collate_fn=SimpleNamespace(scales=[512, 544], stop_epoch=7),
    )
    assert phase_boundaries(schedule, loader) == [
        (1.5, "warm-up ends"), (6.0, "policy ops off: Mosaic"), (7.0, "multi-scale off"), (8.0, "no-augmentation"),
    ]
    rows = [{"epoch": str(e), "train/loss": str(3 - 0.1 * e), "AP": str(0.1 * e), "AP50": str(0.2 * e), "best": "1"} for e in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a collapsed layout from a label far off the axes
        path = plot_results(rows, tmp_path / "results.png", [(50.0, "warm-up ends"), (2.0, "no-augmentation")], epochs=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
