"""Fine-tuning across label sets (dfine/engine/class_transfer.py): the classes a checkpoint shares with the new
dataset keep their rows in every class head, so before any step their logits are the source model's."""

from __future__ import annotations

import logging

import pytest
import torch

import dfine
from dfine.data.synthetic import SYNTHETIC_CLASSES
from dfine.engine.checkpointing import load_for_tuning
from helpers import DEMO_CONFIG, make_demo_checkpoint

SIZE = (64, 64)
# D-FINE-N at 64x64 has 4x4 + 2x2 anchors (strides 16, 32): with as many queries every anchor is selected, so
# both models decode the same positions (in their own score order) whatever the class set does to the ranking.
ALL_ANCHORS = ["model.decoder.num_queries=20", "postprocessor.num_top_queries=20"]
SOURCE_NAMES = [name for name, _ in SYNTHETIC_CLASSES]
# a subset in another order and spelling, plus one class the checkpoint has never seen
TARGET_NAMES = ["Blue_Triangle", "red_circle", "traffic_cone", "CHECKER_DIAMOND"]
KEPT = {0: 2, 1: 0, 3: 5}  # target label -> source label


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def transfer(tmp_path_factory):
    """(source model, target model after load_for_tuning, its report, checkpoint path, logged text)."""
    tmp_path = tmp_path_factory.mktemp("transfer")
    path = make_demo_checkpoint(tmp_path / "source.pth", SIZE, ALL_ANCHORS)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["classes"]["names"] = SOURCE_NAMES
    torch.save(checkpoint, path)
    overrides = [f"eval_spatial_size=[{SIZE[0]}, {SIZE[1]}]", *ALL_ANCHORS]
    source = dfine.build_model(dfine.load_config(DEMO_CONFIG, overrides), load_pretrained=False)
    dfine.load_checkpoint(source, path)
    torch.manual_seed(5)
    target = dfine.build_model(dfine.load_config(DEMO_CONFIG, [*overrides, "num_classes=4"]), load_pretrained=False)
    handler, log = _Collect(), logging.getLogger("dfine.engine.checkpointing")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        report = load_for_tuning(target, path, TARGET_NAMES, "auto")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return source.eval(), target.eval(), report, path, "\n".join(handler.lines)


def test_kept_classes_score_as_in_the_source_model(transfer):
    source, target, report, _, table = transfer
    assert not report.mismatched  # every class tensor was rebuilt at the target's shape
    images = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_s, out_t = source(images), target(images)
    for b in range(images.shape[0]):
        # queries come in score order, which the class set changes: align them by their (identical) boxes
        dist = torch.cdist(out_t["pred_boxes"][b], out_s["pred_boxes"][b])
        order = dist.argmin(dim=1)
        assert dist.min(dim=1).values.max() < 1e-4
        for t, s in KEPT.items():
            # same weights and inputs, different query order: equal up to float summation order (measured ~1e-6)
            torch.testing.assert_close(out_t["pred_logits"][b, :, t], out_s["pred_logits"][b, order, s],
                                       atol=1e-4, rtol=1e-4)
    for t, s in KEPT.items():
        assert f"{TARGET_NAMES[t]}" in table and f"kept   {s} ({SOURCE_NAMES[s]})" in table
    assert "traffic_cone" in table and "3 kept, 1 new" in table


def test_rows_copied_in_every_class_head(transfer):
    _, target, _, path, _ = transfer
    source_state = torch.load(path, weights_only=True)["model"]
    own = target.state_dict()
    heads = [k for k in own if k.startswith(("decoder.enc_score_head.", "decoder.dec_score_head."))]
    assert len(heads) == 2 * (1 + len(target.decoder.dec_score_head))
    for name in heads + ["decoder.denoising_class_embed.weight"]:
        for t, s in KEPT.items():
            assert torch.equal(own[name][t], source_state[name][s]), name  # a copy: exact by construction
    embed = "decoder.denoising_class_embed.weight"
    assert torch.equal(own[embed][-1], source_state[embed][-1])  # the padding row
    assert not torch.equal(own["decoder.enc_score_head.weight"][2], source_state["decoder.enc_score_head.weight"][2])


def test_class_map_none_reinitialises_every_class_row(tmp_path):
    path = make_demo_checkpoint(tmp_path / "source.pth", SIZE)
    cfg = dfine.load_config(DEMO_CONFIG, [f"eval_spatial_size=[{SIZE[0]}, {SIZE[1]}]"])
    torch.manual_seed(5)
    model = dfine.build_model(cfg, load_pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_for_tuning(model, path, SOURCE_NAMES, "none")
    after = model.state_dict()
    source_state = torch.load(path, weights_only=True)["model"]
    assert torch.equal(after["decoder.enc_score_head.weight"], before["decoder.enc_score_head.weight"])
    assert torch.equal(after["decoder.denoising_class_embed.weight"], before["decoder.denoising_class_embed.weight"])
    assert torch.equal(after["decoder.enc_output.proj.weight"], source_state["decoder.enc_output.proj.weight"])
