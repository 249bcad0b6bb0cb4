"""Hugging Face transformers <-> dfine conversion: key mapping, output parity both ways, byte-identical
round trip, and the reference D-FINE-N outputs reproduced by transformers after conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import dfine  # noqa: E402
from dfine.data.coco_categories import MSCOCO_LABEL_TO_CATEGORY  # noqa: E402
from helpers import align_queries  # noqa: E402
from dfine.interop.hf import (  # noqa: E402
    ConversionError, convert_from_hf, convert_to_hf, state_dict_from_hf, state_dict_to_hf,
)

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
CONFIGS = ROOT / "configs"


def _dfine_n_hf_config() -> "transformers.DFineConfig":
    """D-FINE-N written out by hand in transformers' terms (HGNetV2-B0, 2 levels, 3 decoder layers)."""
    backbone = transformers.HGNetV2Config(
        stem_channels=[3, 16, 16], stage_in_channels=[16, 64, 256, 512], stage_mid_channels=[16, 32, 64, 128],
        stage_out_channels=[64, 256, 512, 1024], stage_num_blocks=[1, 1, 2, 1],
        stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 5, 5], stage_numb_of_layers=[3, 3, 3, 3], hidden_sizes=[64, 256, 512, 1024],
        embedding_size=16, depths=[1, 1, 2, 1], out_indices=[3, 4], use_learnable_affine_block=True,
    )
    return transformers.DFineConfig(
        backbone_config=backbone, num_labels=80, encoder_in_channels=[512, 1024], feat_strides=[16, 32],
        encoder_hidden_dim=128, encode_proj_layers=[1], encoder_ffn_dim=512, hidden_expansion=0.34, depth_mult=0.5,
        d_model=128, decoder_in_channels=[128, 128], num_feature_levels=2, decoder_n_points=[6, 6],
        decoder_ffn_dim=512, decoder_layers=3, freeze_backbone_batch_norms=False,
    )


def _rtdetrv2_r18_hf_config() -> "transformers.RTDetrV2Config":
    backbone = transformers.RTDetrResNetConfig(
        hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic", out_indices=[2, 3, 4]
    )
    return transformers.RTDetrV2Config(
        backbone_config=backbone, num_labels=80, encoder_in_channels=[128, 256, 512], hidden_expansion=0.5,
        decoder_layers=3, freeze_backbone_batch_norms=False,
    )


def _perturb_(module: torch.nn.Module, seed: int) -> None:
    """Random init alone leaves features nearly image-independent; noise makes the comparison meaningful."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not name.endswith(("running_var", "reg_scale", "up")):
                tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator))


def _calibrate_batch_norms_(model: torch.nn.Module, size: int, seed: int) -> None:
    """Re-estimate every BatchNorm's statistics on random images so features vary across the image."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batch
        norm.train()
    with torch.no_grad():
        model(pixel_values=torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(seed)))
    model.eval()


def _save_random_hf(cls, hf_config, folder: Path, seed: int, size: int) -> Path:
    torch.manual_seed(seed)
    model = cls(hf_config).eval()
    _perturb_(model, seed)
    _calibrate_batch_norms_(model, size, seed)
    with torch.no_grad():  # spread the encoder scores so which 300 anchors win is not decided by round-off
        model.model.enc_score_head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    model.save_pretrained(folder)
    return folder


def _hf_anchor_index(hf_out, num_queries: int = 300) -> torch.Tensor:
    return hf_out.enc_outputs_class.max(-1).values.topk(num_queries, dim=1).indices


def _ours_from_checkpoint(path: Path):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # must stay weights_only-loadable
    model = dfine.build_model(checkpoint["config"], load_pretrained=False)
    dfine.load_checkpoint(model, path)
    return model.eval(), dfine.build_postprocessor(checkpoint["config"]).eval(), checkpoint


def _check_parity(hf_model, ours, post, images: torch.Tensor) -> None:
    captured = {}  # our encoder scores, to read which anchors our decoder selected
    hook = ours.decoder.enc_score_head.register_forward_hook(lambda _m, _i, out: captured.setdefault("scores", out))
    with torch.no_grad():
        hf_out = hf_model(pixel_values=images)
        out = ours(images)
    hook.remove()
    hf_index = _hf_anchor_index(hf_out)
    best = hf_out.enc_outputs_class.max(-1).values.topk(301, dim=1).values
    assert (best[:, 299] - best[:, 300]).min() > 1e-4, "test data leaves the 300th query to round-off"
    ours_index = captured["scores"].max(-1).values.topk(300, dim=1).indices
    # The decoder does not depend on query order: compare query by query, aligned by anchor (same anchors asserted).
    torch.testing.assert_close(align_queries(out["pred_logits"], ours_index, hf_index), hf_out.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(align_queries(out["pred_boxes"], ours_index, hf_index), hf_out.pred_boxes, atol=1e-4, rtol=0)

    height, width = images.shape[-2:]
    sizes_wh = torch.tensor([[width, height]] * len(images))
    dets = post(out, sizes_wh)
    processor = transformers.RTDetrImageProcessor()
    hf_dets = processor.post_process_object_detection(hf_out, threshold=0.0, target_sizes=sizes_wh.flip(1))
    for ours_det, hf_det in zip(dets, hf_dets):
        torch.testing.assert_close(ours_det["scores"], hf_det["scores"], atol=1e-4, rtol=0)
        confident = hf_det["scores"] > hf_det["scores"].quantile(0.5)  # far from near-ties in the ordering
        hf_labels = hf_det["labels"][confident]
        if post.remap_mscoco_category:
            hf_labels = torch.tensor([MSCOCO_LABEL_TO_CATEGORY[int(i)] for i in hf_labels])
        assert torch.equal(ours_det["labels"][confident].cpu(), hf_labels)
        torch.testing.assert_close(ours_det["boxes"][confident], hf_det["boxes"][confident], atol=1e-2, rtol=0)


def _assert_same_tensor_set(path_a: Path, path_b: Path) -> None:
    a, b = safetensors_torch.load_file(str(path_a)), safetensors_torch.load_file(str(path_b))
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].reshape(-1).view(torch.uint8).equal(b[key].reshape(-1).view(torch.uint8)), key


@pytest.mark.parametrize(
    "family,cls_name,make_config,config_file,size",
    [
        ("dfine", "DFineForObjectDetection", _dfine_n_hf_config, "dfine_n_coco.yml", 320),
        ("rtdetrv2", "RTDetrV2ForObjectDetection", _rtdetrv2_r18_hf_config, "rtdetrv2_r18vd_coco.yml", 320),
    ],
)
def test_hf_model_converts_to_ours_and_back(tmp_path, family, cls_name, make_config, config_file, size):
    if family == "rtdetrv2" and not (CONFIGS / config_file).is_file():
        pytest.skip(f"{config_file} is not written yet")
    cls = getattr(transformers, cls_name)
    hf_dir = _save_random_hf(cls, make_config(), tmp_path / "hf", seed=7, size=size)

    from tools.convert import main

    assert main(["--from-hf", str(hf_dir), "-o", str(tmp_path / "ours.pth")]) == 0
    ours, post, checkpoint = _ours_from_checkpoint(tmp_path / "ours.pth")
    assert checkpoint["config"]["model"]["decoder"]["num_layers"] == 3
    assert checkpoint["classes"]["remap_mscoco_category"] is False  # HF's default LABEL_i names are not COCO's

    hf_model = cls.from_pretrained(hf_dir).eval()
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    _check_parity(hf_model, ours, post, images)

    back = convert_to_hf(checkpoint["config"], checkpoint["model"], tmp_path / "back", classes=checkpoint["classes"], verify=False)
    _assert_same_tensor_set(hf_dir / "model.safetensors", back / "model.safetensors")
    config_back = json.loads((back / "config.json").read_text())
    assert config_back["model_type"] == make_config().model_type
    assert config_back["id2label"]["0"] == "LABEL_0"


def test_reference_dfine_n_through_transformers_matches_reference_outputs(tmp_path):
    needed = [REFERENCE / n for n in ("dfine_n_perturbed.pth", "eval_n_perturbed.pt", "inputs.pt")]
    if not all(p.is_file() for p in needed):
        pytest.skip(f"reference data not found in {REFERENCE}")
    from tools.convert import main

    out_dir = tmp_path / "hf"
    assert main(["--to-hf", "-c", str(CONFIGS / "dfine_n_coco.yml"), "-r", str(needed[0]), "-o", str(out_dir)]) == 0
    processor_config = json.loads((out_dir / "preprocessor_config.json").read_text())
    assert processor_config["size"] == {"height": 640, "width": 640} and processor_config["do_normalize"] is False
    assert json.loads((out_dir / "config.json").read_text())["id2label"]["0"] == "person"

    reference = torch.load(needed[1], weights_only=True)["640"]
    images = torch.load(needed[2], weights_only=True)["images_640_u8"].float() / 255.0
    hf_model = transformers.DFineForObjectDetection.from_pretrained(out_dir).eval()
    with torch.no_grad():
        hf_out = hf_model(pixel_values=images)
    hf_index = _hf_anchor_index(hf_out)
    reference_index = reference["enc_topk_ind"]
    torch.testing.assert_close(align_queries(hf_out.logits, hf_index, reference_index), reference["pred_logits"], atol=1e-3, rtol=0)
    torch.testing.assert_close(align_queries(hf_out.pred_boxes, hf_index, reference_index), reference["pred_boxes"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,keys_file", [("dfine", "state_dict_keys_n.json"), ("rtdetrv2", "rtdetrv2/state_dict_keys_r18.json")])
def test_every_reference_key_maps_and_maps_back(family, keys_file):
    path = REFERENCE / keys_file
    if not path.is_file():
        pytest.skip(f"{path} not found")
    dtypes = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}
    state = {k: torch.zeros(shape, dtype=dtypes[d]) for k, shape, d in json.loads(path.read_text())}
    hf = state_dict_to_hf(state, family, freeze_backbone_norm=True)
    assert not any(k.startswith("backbone") or "anchors" in k or "valid_mask" in k for k in hf)
    assert not any(k.startswith("model.backbone") and k.endswith("num_batches_tracked") for k in hf)
    back = state_dict_from_hf(hf, family, template=state)
    assert list(back) == list(state)
    assert all(back[k].shape == state[k].shape and back[k].dtype == state[k].dtype for k in state)


def test_fused_attention_is_split_into_q_k_v_in_order_and_fused_back():
    weight = torch.arange(12 * 4, dtype=torch.float32).reshape(12, 4)
    bias = torch.arange(12, dtype=torch.float32)
    state = {"encoder.encoder.0.layers.0.self_attn.in_proj_weight": weight,
             "decoder.decoder.layers.1.self_attn.in_proj_bias": bias}
    hf = state_dict_to_hf(state, "dfine")
    assert torch.equal(hf["model.encoder.encoder.0.layers.0.self_attn.q_proj.weight"], weight[:4])
    assert torch.equal(hf["model.encoder.encoder.0.layers.0.self_attn.v_proj.weight"], weight[8:])
    assert torch.equal(hf["model.decoder.layers.1.self_attn.k_proj.bias"], bias[4:8])
    # transformers 5 in-memory spelling is accepted too
    renamed = {k.replace("model.encoder.encoder.", "model.encoder.aifi."): v for k, v in hf.items()}
    back = state_dict_from_hf(renamed, "dfine", template=state)
    assert torch.equal(back["encoder.encoder.0.layers.0.self_attn.in_proj_weight"], weight)
    assert torch.equal(back["decoder.decoder.layers.1.self_attn.in_proj_bias"], bias)


def test_unknown_keys_are_named_in_the_error():
    with pytest.raises(ConversionError, match="decoder.mystery.weight"):
        state_dict_to_hf({"decoder.mystery.weight": torch.zeros(1)}, "dfine")
    with pytest.raises(ConversionError, match="model.something_new"):
        state_dict_from_hf({"model.something_new": torch.zeros(1)}, "dfine", template={})


def test_from_hf_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        convert_from_hf(tmp_path, configs_dir=CONFIGS)
