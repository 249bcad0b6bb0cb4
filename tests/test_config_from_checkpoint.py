"""The config stored in a checkpoint: kept with its ${...} references, so an override given to tools/eval.py (or infer,
export, convert) reaches every use of the key; older checkpoints that store it resolved get the known uses linked
again (dfine.config.config_from_checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dfine
from dfine.ops.boxes import box_cxcywh_to_xyxy
from dfine.config import ConfigError, config_from_checkpoint, finish_config, link_references, load_config, stored_config
from helpers import DEMO_CONFIG, make_demo_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _references(node, path: str = "") -> dict[str, str]:
    """{dotted path: '${...}' string} of every reference in a config."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _references(value, f"{path}.{key}".lstrip(".")).items()}
    if isinstance(node, list):
        return {k: v for i, value in enumerate(node) for k, v in _references(value, f"{path}.{i}").items()}
    return {path: node} if isinstance(node, str) and "${" in node else {}


def test_stored_config_keeps_the_references_of_the_file():
    cfg = load_config(DEMO_CONFIG)
    stored = stored_config(cfg)
    refs = _references(stored)
    expected = {
        "model.encoder.eval_spatial_size": "${eval_spatial_size}", "model.decoder.eval_spatial_size": "${eval_spatial_size}",
        "model.decoder.num_classes": "${num_classes}", "criterion.num_classes": "${num_classes}",
        "postprocessor.num_classes": "${num_classes}", "postprocessor.remap_mscoco_category": "${remap_mscoco_category}",
        "train_dataloader.collate_fn.stop_epoch": "${stop_epoch}",
        "train_dataloader.dataset.transforms.policy.epoch": "${stop_epoch}",
    }
    assert {path: refs.get(path) for path in expected} == expected
    assert finish_config(stored) == cfg
    # a config changed in code after loading is no longer what the file resolves to: its known uses are linked
    cfg["epochs"] = 2
    changed = stored_config(cfg)
    assert changed["epochs"] == 2 and _references(changed) == _references(link_references(cfg))
    assert finish_config(changed) == cfg


@pytest.mark.parametrize("name", ["dfine_n_coco.yml", "rtdetrv2_r18vd_coco.yml", "dfine_l_obj2custom.yml", "deim_dfine_n_coco.yml"])
def test_link_references_finds_the_uses_written_in_the_files(name):
    """For a resolved config, link_references puts back the references the files wrote for num_classes,
    eval_spatial_size, remap_mscoco_category and stop_epoch; only DEIM's per-op epoch lists (values that a
    reference cannot be told from) stay values."""
    cfg = load_config(CONFIGS / name)
    written = _references(stored_config(cfg))
    linked = _references(link_references(cfg))
    assert finish_config(link_references(cfg)) == cfg
    assert set(linked.items()) <= set(written.items())
    left = {path: ref for path, ref in written.items() if linked.get(path) != ref}
    assert all(".policy.epoch." in path or ".mixup_epochs." in path for path in left), left
    assert len(linked) >= 8


def test_override_reaches_every_use_of_a_stored_config(tmp_path):
    checkpoint = torch.load(make_demo_checkpoint(tmp_path / "demo.pth", (256, 256)), weights_only=True)
    assert "${" not in str(checkpoint["config"])  # written resolved, like checkpoints before references were kept
    for stored in (checkpoint["config"], stored_config(checkpoint["config"])):
        cfg = config_from_checkpoint({"config": stored}, ["eval_spatial_size=[320, 320]", "num_classes=3"])
        assert cfg["model"]["decoder"]["eval_spatial_size"] == cfg["model"]["encoder"]["eval_spatial_size"] == [320, 320]
        for loader in ("train_dataloader", "val_dataloader"):
            sizes = [op["size"] for op in cfg[loader]["dataset"]["transforms"]["ops"] if op["type"] == "Resize"]
            assert sizes == [[320, 320]], loader
        assert cfg["model"]["decoder"]["num_classes"] == cfg["postprocessor"]["num_classes"] == cfg["criterion"]["num_classes"] == 3
    with pytest.raises(ConfigError, match="stores no config"):
        config_from_checkpoint({"model": {}}, source="release.pth")


def test_eval_of_a_checkpoint_at_another_size_runs_at_that_size_everywhere(tmp_path, monkeypatch):
    """`tools/eval.py -r ckpt.pth -u eval_spatial_size=[320,320]` on a checkpoint trained at 256: the val Resize, the
    encoder's and decoder's cached sizes and anchors, the model input and the postprocessor's scaling all follow."""
    from dfine.cli import eval as eval_tool

    ckpt = make_demo_checkpoint(tmp_path / "demo.pth", (256, 256))
    seen: dict = {"inputs": [], "orig_sizes": [], "boxes": []}
    build_model, build_dataloader, build_postprocessor = dfine.build_model, dfine.build_dataloader, dfine.build_postprocessor

    def recording_model(cfg, **kwargs):
        seen["model"] = model = build_model(cfg, **kwargs)
        model.register_forward_pre_hook(lambda module, args: seen["inputs"].append(tuple(args[0].shape)) and None)
        return model

    def recording_loader(cfg, split, *args, **kwargs):
        seen[split] = loader = build_dataloader(cfg, split, *args, **kwargs)
        return loader

    def recording_postprocessor(cfg, *args, **kwargs):
        post = build_postprocessor(cfg, *args, **kwargs)
        def record(module, args, out):
            seen["orig_sizes"].append(args[1].tolist())
            seen["boxes"].append((args[0]["pred_boxes"], [d["boxes"] for d in out]))

        post.register_forward_hook(record)
        return post

    monkeypatch.setattr(dfine, "build_model", recording_model)
    monkeypatch.setattr(dfine, "build_dataloader", recording_loader)
    monkeypatch.setattr(dfine, "build_postprocessor", recording_postprocessor)
    code = eval_tool.main([
        "-r", str(ckpt), "--output-dir", str(tmp_path / "eval"), "-d", "cpu", "-u", "eval_spatial_size=[320,320]",
        "val_dataloader.dataset.num_images=4", "val_dataloader.dataset.image_size=200", "val_dataloader.num_workers=0",
        "val_dataloader.total_batch_size=4",
    ])
    assert code == 0 and (tmp_path / "eval" / "eval_metrics.json").is_file()

    resize = [op for op in seen["val"].dataset.transforms.ops if type(op).__name__ == "Resize"]
    assert [op.size for op in resize] == [(320, 320)]
    model = seen["model"]
    assert model.encoder.eval_spatial_size == model.decoder.eval_spatial_size == [320, 320]
    strides = model.decoder.feat_strides
    assert model.decoder._anchor_shapes == [[320 // s, 320 // s] for s in strides]
    assert model.decoder.anchors.shape[1] == sum((320 // s) ** 2 for s in strides)
    assert seen["inputs"] == [(4, 3, 320, 320)]
    # the postprocessor maps the model's normalised boxes to the 200 x 200 images: each detection is one of them
    assert seen["orig_sizes"] == [[[200, 200]] * 4]
    (pred_boxes, detections), = seen["boxes"]
    for normalised, boxes in zip(pred_boxes, detections):
        scaled = box_cxcywh_to_xyxy(normalised) * 200
        assert len(boxes) and torch.cdist(boxes, scaled, p=float("inf")).min(1).values.max() < 1e-3
