"""``compile: true`` (``--compile``): a compiled training run on the tiny stand-in detector of test_engine_trainer
(multi-scale batches, EMA, evaluation), its checkpoint loading into an uncompiled model, and evaluation with and
without compile. The real D-FINE-N takes minutes to compile on a 2-core CPU (README, "Training"), the tiny model
seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dfine
import dfine.engine.trainer as trainer
from dfine.cli import eval as eval_tool
from dfine.cli import train as train_tool
from dfine.config import load_config
from dfine.engine.compiling import compile_image_stages
from dfine.registry import ConfigError
from helpers import DEMO_CONFIG
from test_engine_trainer import tiny_config  # registers the tiny detector's components

# Compiled vs eager eval outputs of the tiny detector: measured max |difference| 3e-8 to 9e-8 (logits and boxes, three
# seeded weight sets, 1 and 2 threads: inductor fuses and reorders the reductions); D-FINE-N compiled whole at 128 px:
# logits 1e-6, boxes 0. 1e-5 leaves two orders of magnitude of headroom.
OUTPUT_ATOL = 1e-5


@pytest.fixture(autouse=True)
def synthetic_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DFINE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def compiled_run_config(tmp_path: Path, output: str, compile: bool) -> dict:
    # one epoch of 4 multi-scale steps (batch sizes 32, 32, 64, 64 px: a second static compile), then evaluation of
    # the EMA copy
    return tiny_config(tmp_path, output, [
        f"compile={str(compile).lower()}", "epochs=1", "stop_epoch=1", "train_dataloader.dataset.num_images=16",
        "val_dataloader.dataset.num_images=4",
    ])


def test_compile_setting_is_checked_and_the_flags_set_it():
    with pytest.raises(ConfigError, match=r"^compile: expected true or false, got 'maybe'$"):
        load_config(DEMO_CONFIG, ["compile=maybe"])
    assert load_config(DEMO_CONFIG)["compile"] is False
    assert train_tool.config_from_args(train_tool.parse_args(["-c", str(DEMO_CONFIG), "--compile"]))["compile"] is True
    args = eval_tool.parse_args(["-r", "x.pth", "-c", str(DEMO_CONFIG), "--compile", "--deploy", "--output-dir", "out"])
    assert eval_tool.config_for(args)["compile"] is True and args.deploy is True


def test_compiled_training_writes_plain_checkpoints_and_evaluates_like_eager(tmp_path, caplog):
    cfg = compiled_run_config(tmp_path, "compiled", compile=True)
    collate = dfine.build_dataloader(cfg, "train").collate_fn
    assert [collate.size_for(0, step) for step in range(4)] == [32, 32, 64, 64]  # the input size changes mid-epoch
    with caplog.at_level("INFO", logger="dfine.engine.compiling"):
        assert trainer.run(cfg) == 0
    assert any("torch.compile on: backbone and encoder of the model and of its EMA copy" in r.message for r in caplog.records)
    out = Path(cfg["output_dir"])
    metrics = json.loads((out / "metrics.json").read_text())
    losses = metrics["epochs"][0]["train"]
    assert set(losses) == {"loss_bbox", "loss_vfl"} and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses

    # the checkpoint has the uncompiled model's keys (no `_orig_mod.`) and loads into an uncompiled model
    checkpoint = torch.load(out / "last.pth", map_location="cpu", weights_only=True)
    plain = dfine.build_model(cfg, load_pretrained=False)
    assert list(checkpoint["model"]) == list(plain.state_dict())
    assert list(checkpoint["ema"]["module"]) == list(plain.state_dict())
    report = dfine.load_checkpoint(plain, checkpoint)
    assert not report.missing and not report.mismatched

    # compiled vs eager forward on the validation images, then the whole evaluation through `dfine eval`
    plain.eval()
    compiled = dfine.build_model(cfg, load_pretrained=False)
    dfine.load_checkpoint(compiled, checkpoint)
    assert compile_image_stages(compiled.eval()) == ["backbone", "encoder"]
    images, _ = next(iter(dfine.build_dataloader(cfg, "val")))
    with torch.no_grad():
        eager_out, compiled_out = plain(images), compiled(images)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(compiled_out[key], eager_out[key], atol=OUTPUT_ATOL, rtol=0)

    results = {}
    for flags in ([], ["--compile"]):
        folder = tmp_path / ("eval_compiled" if flags else "eval_eager")
        assert eval_tool.main(["-r", str(out / "last.pth"), "--output-dir", str(folder), *flags]) == 0
        results[bool(flags)] = json.loads((folder / "eval_metrics.json").read_text())
    # the 12 COCO numbers and the detection count are functions of the ranked detections, which outputs equal
    # within 1e-5 leave unchanged (the tiny model after 4 steps scores AP ~0: this checks the compiled eval path
    # end to end; the outputs themselves are compared above)
    assert results[True]["num_detections"] == results[False]["num_detections"] > 0
    assert results[True]["coco_eval_bbox"] == pytest.approx(results[False]["coco_eval_bbox"], abs=1e-6)
