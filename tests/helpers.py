"""Helpers several test modules share (no ``test_`` prefix, so pytest does not collect it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO.parent / "shared" / "reference"
DEMO_CONFIG = REPO / "configs" / "dfine_n_demo.yml"
DEMO_NAMES = ["circle", "square", "triangle", "cross", "star", "ring"]

# the reference configs/dfine/dfine_hgnetv2_n_coco.yml encoder section
N_ENCODER = dict(in_channels=[512, 1024], feat_strides=[16, 32], hidden_dim=128, use_encoder_idx=[1],
                 dim_feedforward=512, expansion=0.34, depth_mult=0.5)


def reference(name: str):
    """A file of ../shared/reference, or a skip naming it when absent."""
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(f"reference file {path} not found (../shared/reference beside the repo)")
    return torch.load(path, map_location="cpu", weights_only=True)


def make_demo_checkpoint(path: Path, size: tuple[int, int], overrides=()) -> Path:
    """A demo-model checkpoint in our format (weights + config + classes, category id = label + 1). The seeded
    initialisation gets seeded noise so that the features depend on the image; plain initialisation gives
    nearly tied scores."""
    import dfine

    cfg = dfine.load_config(DEMO_CONFIG, [f"eval_spatial_size=[{size[0]}, {size[1]}]", *overrides])
    torch.manual_seed(0)
    model = dfine.build_model(cfg, load_pretrained=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    classes = {"names": DEMO_NAMES, "label_to_category": {i: i + 1 for i in range(6)}, "remap_mscoco_category": False}
    torch.save({"model": model.state_dict(), "config": cfg, "classes": classes}, path)
    return path


def run_killed_at_epoch_1(monkeypatch, trainer, cfg: dict) -> Path:
    """Run ``trainer.run(cfg)`` until a simulated kill at the start of epoch 1 (after the epoch-0 checkpoint);
    returns the output folder, ready for ``trainer.run(cfg, resume=.../last.pth)``."""
    real_epoch = trainer.train_one_epoch

    def dies_at_epoch_1(*args, epoch, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill")
        return real_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", dies_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(cfg)
    monkeypatch.setattr(trainer, "train_one_epoch", real_epoch)
    return Path(cfg["output_dir"])


# -- comparing query-ordered outputs ----------------------------------------------------------------------------
# Which anchors the encoder selects is a top-k over scores: queries whose scores differ by ~1e-6 swap places between
# CPUs and thread counts (the reference itself varies by 1e-5 in encoder scores, ../shared/reference/README.md).
# The decoder does not depend on query order, so rows are compared per anchor, never per position.


def align_queries(ours: torch.Tensor, our_ind: torch.Tensor, ref_ind: torch.Tensor) -> torch.Tensor:
    """``ours`` [B, Q, ...] put in the reference's query order: row j of image b is our query built from anchor
    ``ref_ind[b, j]``. Asserts that both selected the same anchors, which holds when the score gap at the top-k
    boundary is far above the noise (recorded data: >= 2.4e-4 for D-FINE-N, >= 5e-4 for RT-DETRv2-R18, against
    1e-5 of noise)."""
    rows = []
    for b in range(ours.shape[0]):
        assert set(our_ind[b].tolist()) == set(ref_ind[b].tolist()), f"image {b}: different anchors selected"
        where = {anchor: q for q, anchor in enumerate(our_ind[b].tolist())}
        rows.append(ours[b, [where[a] for a in ref_ind[b].tolist()]])
    return torch.stack(rows)


def shared_anchor_rows(ind_a: torch.Tensor, ind_b: torch.Tensor, min_shared: int) -> tuple[list[int], list[int]]:
    """For one image's anchor indices [Q] of two runs: the rows of each that hold the anchors both selected, in the
    same anchor order. For runs whose top-k boundary is not guarded by a large score gap (e.g. deploy fusion on
    random weights), where a near-tied anchor may enter one selection and not the other."""
    rows_a = {anchor: q for q, anchor in enumerate(ind_a.tolist())}
    rows_b = {anchor: q for q, anchor in enumerate(ind_b.tolist())}
    shared = sorted(rows_a.keys() & rows_b.keys())
    assert len(shared) >= min_shared, f"only {len(shared)} of {len(rows_a)} selected anchors shared"
    return [rows_a[a] for a in shared], [rows_b[a] for a in shared]


def assert_close_by_anchor(a: dict, b: dict, keys=("pred_logits", "pred_boxes"), atol=None, min_shared=None) -> None:
    """Two outputs dicts of the same model (``enc_topk_ind`` [B, Q] included) agree query by query after alignment
    by anchor. ``atol``: one float or a dict key -> float; ``min_shared``: anchors both must have selected per
    image (default: all)."""
    for image in range(a["enc_topk_ind"].shape[0]):
        need = a["enc_topk_ind"].shape[1] if min_shared is None else min_shared
        rows_a, rows_b = shared_anchor_rows(a["enc_topk_ind"][image], b["enc_topk_ind"][image], need)
        for key in keys:
            tol = atol[key] if isinstance(atol, dict) else atol
            torch.testing.assert_close(a[key][image, rows_a], b[key][image, rows_b], atol=tol, rtol=0,
                                       msg=lambda m, key=key: f"{key}, image {image}: {m}")


def assert_same_noised_boxes(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Denoising boxes [B, N, 4], stored as logits, compared as boxes (their sigmoid). The inverse sigmoid near its
    clamp (x = 1 - 1e-5) turns one ulp of x into up to 6e-3 of logit, so the logits' last bits depend on the CPU's
    vector kernels. As boxes, the noising arithmetic (a few multiply-adds) differs by a few ulps (6e-8 each in
    [0.5, 1)): 5e-7 is 8 ulps, and the logit error it allows moves no refined box by more than 1e-6."""
    torch.testing.assert_close(torch.sigmoid(ours), torch.sigmoid(theirs), atol=5e-7, rtol=0)


# Post-processed boxes are pixels up to 640: one float32 ulp there is 6e-5, and the conversion (cxcywh -> xyxy,
# times the image size) may or may not fuse a multiply-add depending on the CPU's kernels, so a fixed 1e-4 px is
# under two ulps. 1e-4 px plus 5e-7 relative (4 ulps) holds on one-ulp-nudged inputs (measured 1.2e-4 px at a
# 500-px coordinate) and stays 10x below the reference's own spread (6e-6 normalised = 3.8e-3 px at 640).
PIXEL_BOX_TOL = dict(atol=1e-4, rtol=5e-7)


# -- tolerance headroom -------------------------------------------------------------------------------------------


def nudge_one_ulp(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a float tensor with every element moved by one unit in the last place, up or down: the size of
    the difference another CPU's kernels (AVX2 vs AVX-512, another libm) or another thread count makes in one
    operation. A parity bound that fails on nudged inputs depends on the last bits of this machine. The direction
    comes from each value's own lowest mantissa bit, so equal values (one tensor saved under two keys, a teacher and
    its student) move together and identities such as KL(p || p) = 0 survive."""
    int_view = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                torch.float64: torch.int64}[tensor.dtype]
    up = (tensor.view(int_view) & 1) == 0
    towards = torch.where(up, torch.full_like(tensor, float("inf")), torch.full_like(tensor, float("-inf")))
    return torch.nextafter(tensor, towards)


def nudge_floats(tree):
    """``nudge_one_ulp`` applied to every floating-point tensor of a nested dict/list (integers left exact)."""
    if isinstance(tree, dict):
        return {k: nudge_floats(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(nudge_floats(v) for v in tree)
    if torch.is_tensor(tree) and tree.is_floating_point():
        return nudge_one_ulp(tree)
    return tree
