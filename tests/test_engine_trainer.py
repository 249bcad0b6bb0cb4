"""The trainer end to end on the synthetic data with a tiny stand-in detector (registered here), so the engine
is tested on its own: loss goes down, checkpoints and metrics appear, and kill + resume equals an
uninterrupted run bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dfine.engine.trainer as trainer
from dfine.config import load_config
from helpers import run_killed_at_epoch_1
from dfine.registry import BACKBONES, CRITERIONS, DECODERS, DETECTORS, ENCODERS, MATCHERS, POSTPROCESSORS

REPO = Path(__file__).resolve().parents[1]
NUM_QUERIES = 8


def _register(registry, cls):
    if cls.__name__ not in registry:
        registry.register(cls)
    return cls


class TinyBackbone(nn.Module):
    def __init__(self, channels: int = 8, pretrained: bool = False):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, channels, 3, stride=4, padding=1), nn.BatchNorm2d(channels), nn.ReLU())

    def forward(self, x):
        return self.conv(x)


class TinyEncoder(nn.Module):
    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))  # [B, C]


class TinyDecoder(nn.Module):
    def __init__(self, channels: int = 8, num_classes: int = 6):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(NUM_QUERIES, channels) * 0.1)
        self.cls = nn.Linear(channels, num_classes)
        self.box = nn.Linear(channels, 4)

    def forward(self, feats):
        h = feats[:, None, :] + self.queries[None]  # [B, Q, C]
        return {"pred_logits": self.cls(h), "pred_boxes": self.box(h).sigmoid()}


class TinyDetector(nn.Module):
    def __init__(self, backbone, encoder, decoder):
        super().__init__()
        self.backbone, self.encoder, self.decoder = backbone, encoder, decoder

    def forward(self, images, targets=None):
        return self.decoder(self.encoder(self.backbone(images)))


class TinyMatcher(nn.Module):
    def forward(self, outputs, targets):
        return [torch.arange(min(len(t["labels"]), NUM_QUERIES)) for t in targets]


class TinyCriterion(nn.Module):
    """Query i learns object i: L1 on boxes and BCE on one-hot classes."""

    def __init__(self, matcher, num_classes: int = 6):
        super().__init__()
        self.matcher, self.num_classes = matcher, num_classes

    def forward(self, outputs, targets):
        l1, bce = 0.0, 0.0
        for b, (t, idx) in enumerate(zip(targets, self.matcher(outputs, targets))):
            onehot = torch.zeros(NUM_QUERIES, self.num_classes)
            onehot[idx, t["labels"][: len(idx)]] = 1.0
            bce = bce + nn.functional.binary_cross_entropy_with_logits(outputs["pred_logits"][b], onehot)
            if len(idx):
                l1 = l1 + (outputs["pred_boxes"][b, idx] - t["boxes"][: len(idx)]).abs().mean()
        return {"loss_bbox": l1 / len(targets) * 5, "loss_vfl": bce / len(targets)}


class TinyPostProcessor(nn.Module):
    def __init__(self, num_classes: int = 6):
        super().__init__()

    def forward(self, outputs, orig_sizes):
        scores, labels = outputs["pred_logits"].sigmoid().max(-1)
        cx, cy, w, h = outputs["pred_boxes"].unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * orig_sizes.repeat(1, 2)[:, None, :]
        return [{"labels": l, "boxes": bx, "scores": s} for l, bx, s in zip(labels, boxes, scores)]


for _registry, _cls in ((BACKBONES, TinyBackbone), (ENCODERS, TinyEncoder), (DECODERS, TinyDecoder), (DETECTORS, TinyDetector),
                        (MATCHERS, TinyMatcher), (CRITERIONS, TinyCriterion), (POSTPROCESSORS, TinyPostProcessor)):
    _register(_registry, _cls)


def write_tiny_config(path: Path, bases: list[str], settings: str = "") -> Path:
    """A config file for the tiny stand-in detector at 64 px: ``configs/base/<name>.yml`` for each of ``bases``
    (in that order: later files override earlier ones), then ``settings`` (more YAML)."""
    includes = ", ".join(f"'{REPO / 'configs' / 'base' / name}.yml'" for name in bases)
    path.write_text(f"""
__include__: [{includes}]
eval_spatial_size: [64, 64]
model:
  type: TinyDetector
  backbone: {{type: TinyBackbone}}
  encoder: {{type: TinyEncoder}}
  decoder: {{type: TinyDecoder, num_classes: '${{num_classes}}'}}
criterion: {{type: TinyCriterion, num_classes: '${{num_classes}}', matcher: {{type: TinyMatcher}}}}
postprocessor: {{type: TinyPostProcessor}}
""" + settings)
    return path


def tiny_config(tmp_path: Path, output: str, extra=()) -> dict:
    path = write_tiny_config(tmp_path / "tiny.yml", ["runtime", "optimizer", "dataloader", "synthetic_detection"])
    overrides = [
        f"output_dir={tmp_path / output}", "device=cpu", "use_amp=false", "epochs=3", "stop_epoch=2", "seed=7",
        "print_freq=1", "checkpoint_freq=2", "optimizer.lr=0.01", "optimizer.params.0.lr=0.01",
        "lr_warmup_scheduler.warmup_duration=3", "ema.warmups=5", "ema.restart_decay=0.5",
        "train_dataloader.dataset.num_images=24", "train_dataloader.dataset.image_size=64",
        "val_dataloader.dataset.num_images=8", "val_dataloader.dataset.image_size=64",
        "train_dataloader.total_batch_size=4", "val_dataloader.total_batch_size=4",
        "train_dataloader.num_workers=0", "val_dataloader.num_workers=0",
        "train_dataloader.collate_fn.base_size=64", "train_dataloader.collate_fn.base_size_repeat=2",
        *extra,
    ]
    return load_config(path, overrides)


@pytest.fixture(autouse=True)
def synthetic_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DFINE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.set_num_threads(1)


def states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_train_resume_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "full")
    assert trainer.run(cfg) == 0
    full_dir = Path(cfg["output_dir"])
    for name in ("last.pth", "best.pth", "checkpoint0001.pth", "metrics.json", "config.yml", "detections.png"):
        assert (full_dir / name).is_file(), name
    assert list((full_dir / "summary").glob("events.out.tfevents.*"))
    metrics = json.loads((full_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1, 2]
    assert [e["phase"] for e in metrics["epochs"]] == ["main", "main", "no-augmentation"]
    first, last = metrics["epochs"][0]["train"], metrics["epochs"][-1]["train"]
    assert sum(last.values()) < sum(first.values())  # the loss went down
    full = torch.load(full_dir / "last.pth", weights_only=True)
    assert full["last_epoch"] == 2 and full["ema"]["decay"] == 0.5  # restart decay in force after stop_epoch

    # "kill" the second run right after its epoch-0 checkpoint, then resume it
    cfg2 = tiny_config(tmp_path, "interrupted")
    resumed_dir = run_killed_at_epoch_1(monkeypatch, trainer, cfg2)
    assert torch.load(resumed_dir / "last.pth", weights_only=True)["last_epoch"] == 0
    torch.manual_seed(12345)  # a fresh process would not share our RNG state either
    assert trainer.run(cfg2, resume=str(resumed_dir / "last.pth")) == 0
    resumed = torch.load(resumed_dir / "last.pth", weights_only=True)
    assert resumed["global_step"] == full["global_step"]
    assert states_equal(resumed["model"], full["model"])
    assert states_equal(resumed["ema"]["module"], full["ema"]["module"])
    for a, b in zip(resumed["optimizer"]["state"].values(), full["optimizer"]["state"].values()):
        assert states_equal(a, b)
    resumed_metrics = json.loads((resumed_dir / "metrics.json").read_text())
    assert [e["eval"]["stats"]["AP"] for e in resumed_metrics["epochs"]] == [e["eval"]["stats"]["AP"] for e in metrics["epochs"]]


def test_eval_tool_reads_config_from_checkpoint(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "run", ["epochs=1", "stop_epoch=1"])
    assert trainer.run(cfg) == 0
    best = Path(cfg["output_dir"]) / "best.pth"
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_tool", REPO / "tools" / "eval.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["-r", str(best), "--output-dir", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    trained = json.loads((Path(cfg["output_dir"]) / "metrics.json").read_text())
    assert evaluated["stats"]["AP"] == trained["epochs"][0]["eval"]["stats"]["AP"]

    # a validation set that is not there: one clear line and exit status 2, no traceback
    capsys.readouterr()
    missing = tmp_path / "nowhere" / "instances_val.json"
    code = tool.main([
        "-r", str(best), "--output-dir", str(tmp_path / "eval2"),
        "-u", f"val_dataloader.dataset={{type: CocoDetection, img_folder: '{tmp_path}', ann_file: '{missing}'}}",
    ])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: annotation file not found") and str(missing) in err


@pytest.mark.parametrize(("config", "reload"), [("dfine_n_coco.yml", True), ("rtdetrv2_r18vd_coco.yml", False)])
def test_no_augmentation_phase_starts_from_best_weights_only_for_d_fine(tmp_path, config, reload):
    """D-FINE's reference continues from its best checkpoint at stop_epoch; RT-DETRv2's keeps its weights."""
    from types import SimpleNamespace

    cfg = load_config(REPO / "configs" / config)
    assert cfg["reload_best_at_stop_epoch"] is reload
    model, best = nn.Linear(3, 2), nn.Linear(3, 2)
    torch.save({"model": best.state_dict()}, tmp_path / "best.pth")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    loader = SimpleNamespace(dataset=SimpleNamespace(), collate_fn=None)
    trainer.enter_no_augmentation_phase(5, loader, None, model, optimizer, tmp_path, reload_best=cfg["reload_best_at_stop_epoch"])
    expected = best.state_dict() if reload else before
    assert states_equal(model.state_dict(), expected)
