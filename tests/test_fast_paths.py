"""Speed paths that must not change a single bit: the no-autograd eval path (in-place sums and activations, the
stem's max of shifted views) against the autograd path of the same model, and the channels-last layout that
training keeps through the encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dfine
from dfine.layers.conv import memory_format_of
from dfine.models.backbones.hgnetv2 import _max_of_2x2_windows

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_max_of_shifted_views_is_the_stem_max_pool(layout):
    generator = torch.Generator().manual_seed(0)
    # small integers make ties everywhere; NaN and -inf must propagate and lose as max_pool2d's do
    x = torch.randint(-3, 4, (2, 5, 9, 11), generator=generator).float()
    x[0, 1, 4, 4] = float("nan")
    x[1, 2, 0, :] = -float("inf")
    x = x.contiguous(memory_format=layout)
    expected = torch.nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)(x)
    got = _max_of_2x2_windows(x)
    assert got.shape == expected.shape == (2, 5, 8, 10)
    # exact on every CPU: a maximum selects one of its inputs, nothing is rounded
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    assert got.isnan().sum() == 4  # the four windows that hold the NaN


def _model(config: str, reference_dir: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = dfine.build_model(dfine.load_config(str(CONFIGS / config)), load_pretrained=False)
    weights = reference_dir / "dfine_n_perturbed.pth"
    if config == "dfine_n_coco.yml":
        dfine.load_checkpoint(model, weights)  # trained-like weights: BN statistics and LAB scales far from init
    return model.eval()


@pytest.mark.parametrize("config", ["dfine_n_coco.yml", "rtdetrv2_r18vd_coco.yml"])
def test_eval_without_autograd_equals_the_autograd_path_bit_for_bit(config, reference_dir):
    # With autograd on, every block takes its out-of-place form (the stem keeps MaxPool2d); under no_grad the
    # same products are summed into fresh maps in place. The two must agree exactly, not within a tolerance: both
    # run in one process on one CPU, and in-place and out-of-place forms share their kernels.
    model = _model(config, reference_dir)
    images = torch.rand(2, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = model(images)
    with torch.enable_grad():
        slow = model(images)
    assert slow["pred_logits"].requires_grad and not fast["pred_logits"].requires_grad
    for key in ("pred_logits", "pred_boxes", "enc_topk_ind"):
        assert torch.equal(fast[key], slow[key].detach()), key


def test_training_keeps_the_encoder_channels_last(reference_dir):
    # An NCHW map from the AIFI layer would turn every concatenation after it, and so the whole fusion path, NCHW:
    # on CPU its 1x1 convolution backward at stride 8 is 2-3x slower (D-FINE-S: 197 vs 76 ms for cv4 of the
    # stride-8 FPN block, profiled).
    model = _model("dfine_n_coco.yml", reference_dir).train()
    seen = []
    model.encoder.register_forward_hook(lambda module, args, outputs: seen.extend(outputs))
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    model(torch.rand(2, 3, 320, 320), targets=targets)
    assert [memory_format_of(x) for x in seen] == [torch.channels_last] * len(model.encoder.in_channels)
    model.eval()
    seen.clear()
    with torch.no_grad():
        model(torch.rand(1, 3, 320, 320))
    assert [memory_format_of(x) for x in seen] == [torch.contiguous_format] * len(model.encoder.in_channels)  # NCHW: parity


def test_scored_rows_keeps_the_dense_values_and_gives_the_dense_gradient():
    from dfine.models.query_selection import scored_rows

    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 5)
    memory = torch.randn(2, 60, 16, generator=generator)
    upstream = torch.randn(2, 7, 5, generator=generator)

    def picked(x, index):
        return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def run(sparse: bool):
        head.zero_grad()
        x = memory.clone().requires_grad_()
        with torch.no_grad():
            index = head(x).max(-1).values.topk(7, dim=1).indices
        if sparse:
            with torch.no_grad():
                dense = head(x)
            out = scored_rows(picked(dense, index), head, picked(x, index))
        else:
            out = picked(head(x), index)  # the reference's form: gather from a differentiable dense output
        out.backward(upstream)
        return out.detach(), x.grad, head.weight.grad.clone(), head.bias.grad.clone()

    dense, sparse = run(False), run(True)
    assert torch.equal(sparse[0], dense[0])  # forward: the same numbers, not merely close
    for got, expected in zip(sparse[1:], dense[1:]):
        # the same sums over the live rows; the dense backward may add the dead (zero) rows in another order
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert sparse[1].abs().sum(-1).count_nonzero() == 14  # only the picked rows get a gradient


@pytest.mark.parametrize("block", ["RepNCSPELAN4", "CSPRepLayer"])
def test_fpn_blocks_read_an_upsampled_join_as_its_concatenation(block, monkeypatch):
    # In training the coarse part of an FPN block's input meets the block's 1x1 convs at its own resolution. The
    # same function as on the concatenation; only the rounding of the split sum may move (measured: outputs and
    # gradients within 1.8e-6 of their largest entry, 1 and 2 threads; bound 2e-5).
    from dfine.layers import conv as conv_module

    builds = []
    build = conv_module.UpsampledJoin.build
    monkeypatch.setattr(conv_module.UpsampledJoin, "build", lambda join: builds.append(1) or build(join))

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    make = {"RepNCSPELAN4": lambda: conv_module.RepNCSPELAN4(64, 32, 32, 16, 1),
            "CSPRepLayer": lambda: conv_module.CSPRepLayer(64, 32, 1, expansion=0.5)}[block]
    module = make().train()
    coarse = torch.randn(2, 32, 6, 5, generator=generator).contiguous(memory_format=torch.channels_last)
    lateral = torch.randn(2, 32, 12, 10, generator=generator).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(2, 32, 12, 10, generator=generator)

    def run(as_parts: bool):
        module.zero_grad()
        c, lat = coarse.clone().requires_grad_(), lateral.clone().requires_grad_()
        join = conv_module.UpsampledJoin(c, lat)
        out = module(join if as_parts else join.build())
        out.backward(upstream)
        return [out.detach(), c.grad, lat.grad] + [p.grad.clone() for p in module.parameters() if p.grad is not None]

    parts = run(True)
    assert not builds  # every conv that reads the join is a plain 1x1: no concatenation built
    built = run(False)
    assert len(parts) == len(built)
    for got, expected in zip(parts, built):
        scale = expected.abs().max()
        assert (got - expected).abs().max() <= 2e-5 * scale

    # anything but a plain 1x1 conv gets the concatenation itself: bit for bit
    conv3 = torch.nn.Conv2d(64, 8, 3, padding=1, bias=False)
    join = conv_module.UpsampledJoin(coarse, lateral)
    assert torch.equal(conv_module.conv_of(conv3, join), conv3(join.build()))


def test_the_encoder_hands_fpn_blocks_the_unbuilt_join_in_training_only(reference_dir, monkeypatch):
    from dfine.layers import conv as conv_module

    seen = []
    conv_of = conv_module.conv_of
    monkeypatch.setattr(conv_module, "conv_of", lambda conv, x: seen.append(type(x).__name__) or conv_of(conv, x))
    model = _model("dfine_n_coco.yml", reference_dir)
    feats = model.backbone(torch.rand(2, 3, 320, 320))
    model.encoder.train()(feats)
    assert seen.count("UpsampledJoin") == len(model.encoder.fpn_blocks)  # RepNCSPELAN4: its cv1 alone
    seen.clear()
    with torch.no_grad():
        model.encoder.eval()(feats)  # eval concatenates, as the reference does: exact parity
    assert seen and "UpsampledJoin" not in seen


@pytest.mark.parametrize("grad_layout", ["same", "other", "amp"])
def test_learnable_affine_block_in_training_matches_autograd(grad_layout):
    # HGNetV2's LAB in training: the forward is the reference's two roundings bit for bit; the scale's gradient is
    # one dot product instead of autograd's sum of a materialised product (when grad and input share a layout).
    # Both forms are checked against float64 sums: measured error <= 8e-9 of the sum of magnitudes, 1 and 2
    # threads; bound 1e-6.
    from dfine.models.backbones.hgnetv2 import LearnableAffineBlock

    generator = torch.Generator().manual_seed(0)
    lab = LearnableAffineBlock(1.3, -0.2)
    x = torch.randn(2, 16, 40, 40, generator=generator).relu().contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 16, 40, 40, generator=generator)
    grad = grad if grad_layout == "other" else grad.contiguous(memory_format=torch.channels_last)
    if grad_layout == "amp":  # same layout, but a bfloat16 map under autocast meets a float32 gradient
        x = x.bfloat16()

    def run(module_form: bool):
        lab.zero_grad()
        leaf = x.clone().requires_grad_()
        out = lab(leaf) if module_form else lab.scale * leaf + lab.bias
        out.backward(grad)
        return out.detach(), leaf.grad, lab.scale.grad.clone(), lab.bias.grad.clone()

    fused, plain = run(True), run(False)
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])
    exact_scale = (grad.double() * x.double()).sum()
    exact_bias = grad.double().sum()
    for got in (fused, plain):
        assert abs(got[2].item() - exact_scale.item()) <= 1e-6 * grad.double().mul(x).abs().sum().item()
        assert abs(got[3].item() - exact_bias.item()) <= 1e-6 * grad.double().abs().sum().item()
