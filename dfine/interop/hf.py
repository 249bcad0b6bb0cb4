"""Hugging Face transformers <-> dfine checkpoints, both directions, for D-FINE and RT-DETRv2.

    convert_to_hf(cfg, state_dict, out_dir, class_names)   # config.json + model.safetensors + preprocessor_config.json
    checkpoint = convert_from_hf(hf_dir, base_config_path)  # {"model", "config", "classes", ...}: our format

Conversion moves weights only. transformers' D-FINE training loss is not the reference's: its auxiliary
terms are shifted by one decoder layer, it has no GO-LSD union matching and no FGL term on the final layer.
Fine-tune here (``--from-hf``, then ``tools/train.py -t``) and publish back with ``--to-hf``.

The safetensors written here use the names transformers stores on disk (those of the ustc-community/dfine-*
and PekingU/rtdetr_v2_* folders); transformers 5 renames some of them when it loads (``out_proj`` ->
``o_proj``, ``fc1``/``fc2`` -> ``mlp.*``, ``encoder.encoder`` -> ``encoder.aifi``), and ``convert_from_hf``
accepts both spellings.

Key mapping (ours -> HF; ``{i}`` one name component, ``{m*}`` a dotted path, kept as is)
----------------------------------------------------------------------------------------

==========================================================  ============================================================
ours                                                        Hugging Face
==========================================================  ============================================================
*HGNetV2 backbone (D-FINE)*
backbone.stem.{m*}.conv|bn|lab.{p}                          model.backbone.model.embedder.{m*}.convolution|normalization|lab.{p}
backbone.stages.{m*}.conv|bn|lab.{p}                        model.backbone.model.encoder.stages.{m*}.convolution|normalization|lab.{p}
*PResNet-vd backbone (RT-DETRv2)*
backbone.conv1.conv1_{1,2,3}.conv|norm.{p}                  model.backbone.model.embedder.embedder.{0,1,2}.convolution|normalization.{p}
backbone.res_layers.{i}.blocks.{j}.branch2{a,b,c}.conv|norm  model.backbone.model.encoder.stages.{i}.layers.{j}.layer.{0,1,2}.convolution|normalization
backbone.res_layers.{i}.blocks.{j}.short.conv|norm          ...stages.{i}.layers.{j}.shortcut.convolution|normalization  (no pooling)
backbone.res_layers.{i}.blocks.{j}.short.conv.conv|norm     ...stages.{i}.layers.{j}.shortcut.1.convolution|normalization (avg-pool first)
*HybridEncoder*
encoder.input_proj.{i}.conv|norm.{p}                        model.encoder_input_proj.{i}.0|1.{p}
encoder.encoder.{i}.layers.{j}.self_attn.in_proj_weight|bias model.encoder.encoder.{i}.layers.{j}.self_attn.q_proj|k_proj|v_proj.weight|bias (split in 3 along dim 0)
encoder.encoder.{i}.layers.{j}.self_attn.out_proj.{p}       model.encoder.encoder.{i}.layers.{j}.self_attn.out_proj.{p}
encoder.encoder.{i}.layers.{j}.linear1|linear2.{p}          model.encoder.encoder.{i}.layers.{j}.fc1|fc2.{p}
encoder.encoder.{i}.layers.{j}.norm1|norm2.{p}              model.encoder.encoder.{i}.layers.{j}.self_attn_layer_norm|final_layer_norm.{p}
encoder.{fpn,pan}_blocks.{i}.cv1|cv4.{m*}  (D-FINE)          model.encoder.{fpn,pan}_blocks.{i}.conv1|conv4.{m*}
encoder.{fpn,pan}_blocks.{i}.cv2.0|cv3.0.{m*}  (D-FINE)      model.encoder.{fpn,pan}_blocks.{i}.csp_rep1|csp_rep2.{m*}
encoder.{fpn,pan}_blocks.{i}.cv2.1|cv3.1.{m*}  (D-FINE)      model.encoder.{fpn,pan}_blocks.{i}.conv2|conv3.{m*}
encoder.downsample_convs.{i}.0.cv{n}.{m*}  (D-FINE SCDown)   model.encoder.downsample_convs.{i}.conv{n}.{m*}
encoder.{m*}  (the rest: lateral_convs, RT-DETR blocks)      model.encoder.{m*}
*Decoder*
decoder.input_proj.{i}.conv|norm.{p}                        model.decoder_input_proj.{i}.0|1.{p}
decoder.decoder.layers.{i}.self_attn.in_proj_weight|bias    model.decoder.layers.{i}.self_attn.q_proj|k_proj|v_proj.weight|bias (split in 3)
decoder.decoder.layers.{i}.self_attn.out_proj.{p}           model.decoder.layers.{i}.self_attn.out_proj.{p}
decoder.decoder.layers.{i}.norm1|norm2|norm3.{p}            model.decoder.layers.{i}.self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm.{p}
decoder.decoder.layers.{i}.linear1|linear2.{p}              model.decoder.layers.{i}.fc1|fc2.{p}
decoder.decoder.layers.{i}.cross_attn.num_points_scale      model.decoder.layers.{i}.encoder_attn.num_points_scale (D-FINE) | .n_points_scale (RT-DETRv2)
decoder.decoder.layers.{i}.cross_attn.{m*}                  model.decoder.layers.{i}.encoder_attn.{m*}
decoder.decoder.layers.{i}.gateway.{m*}                     model.decoder.layers.{i}.gateway.{m*}
decoder.decoder.lqe_layers.{m*}                             model.decoder.lqe_layers.{m*}
decoder.dec_score_head.{m*}                                 model.decoder.class_embed.{m*}  (transformers ties class_embed.{m*} to it)
decoder.dec_bbox_head.{m*}                                  model.decoder.bbox_embed.{m*}   (transformers ties bbox_embed.{m*} to it)
decoder.pre_bbox_head|query_pos_head.{m*}                   model.decoder.pre_bbox_head|query_pos_head.{m*}
decoder.denoising_class_embed|enc_score_head|enc_bbox_head  model.denoising_class_embed|enc_score_head|enc_bbox_head
decoder.enc_output.proj|norm.{p}                            model.enc_output.0|1.{p}
decoder.up, decoder.reg_scale                               model.decoder.up, model.decoder.reg_scale (int64 here, float32 there)
==========================================================  ============================================================

Not stored in the HF files, recomputed by the model that loads them: ``decoder.anchors``,
``decoder.valid_mask`` (from the feature sizes), ``decoder.decoder.up`` and ``decoder.decoder.reg_scale``
(aliases of ``decoder.up``/``decoder.reg_scale``), and ``num_batches_tracked`` of BatchNorms that
transformers replaces by frozen ones (the backbone's, unless ``freeze_backbone_batch_norms`` is false) or
whose counters a file omits (the released folders omit them all): these are filled with 0.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dfine.checkpoint import CheckpointError
from dfine.data.classes import LabelMap
from dfine.interop.hf_config import (
    DFINE,
    RTDETRV2,
    ConversionError,
    base_config_name,
    family_of_hf_config,
    hf_config_from_ours,
    overrides_from_hf,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rename:
    """One key rule, usable both ways. ``{name}`` stands for one name component, ``{name*}`` for a dotted path."""

    ours: str
    hf: str


@dataclass(frozen=True)
class FusedAttention:
    """torch.nn.MultiheadAttention's ``in_proj_{weight,bias}`` [3*d(, d)] here, three q/k/v tensors there.
    ``{p}`` is ``weight`` or ``bias``; ``{qkv}`` is ``q``, ``k`` or ``v`` (that order along dim 0)."""

    ours: str
    hf: str


def _stage_rules(ours_root: str, hf_root: str) -> list[Rename]:
    return [
        Rename(f"{ours_root}.{{m*}}.conv.{{p}}", f"{hf_root}.{{m*}}.convolution.{{p}}"),
        Rename(f"{ours_root}.{{m*}}.bn.{{p}}", f"{hf_root}.{{m*}}.normalization.{{p}}"),
        Rename(f"{ours_root}.{{m*}}.lab.{{p}}", f"{hf_root}.{{m*}}.lab.{{p}}"),
    ]


HGNETV2_RULES = _stage_rules("backbone.stem", "model.backbone.model.embedder") + _stage_rules(
    "backbone.stages", "model.backbone.model.encoder.stages"
)

_RES = "backbone.res_layers.{i}.blocks.{j}"
_HF_RES = "model.backbone.model.encoder.stages.{i}.layers.{j}"
PRESNET_RULES = [
    *(
        Rename(f"backbone.conv1.conv1_{n + 1}.{ours}.{{p}}", f"model.backbone.model.embedder.embedder.{n}.{hf}.{{p}}")
        for n in range(3)
        for ours, hf in (("conv", "convolution"), ("norm", "normalization"))
    ),
    *(
        Rename(f"{_RES}.branch2{branch}.{ours}.{{p}}", f"{_HF_RES}.layer.{n}.{hf}.{{p}}")
        for n, branch in enumerate("abc")
        for ours, hf in (("conv", "convolution"), ("norm", "normalization"))
    ),
    Rename(f"{_RES}.short.conv.conv.{{p}}", f"{_HF_RES}.shortcut.1.convolution.{{p}}"),
    Rename(f"{_RES}.short.conv.norm.{{p}}", f"{_HF_RES}.shortcut.1.normalization.{{p}}"),
    Rename(f"{_RES}.short.conv.{{p}}", f"{_HF_RES}.shortcut.convolution.{{p}}"),
    Rename(f"{_RES}.short.norm.{{p}}", f"{_HF_RES}.shortcut.normalization.{{p}}"),
]

_AIFI = "encoder.encoder.{i}.layers.{j}"
ENCODER_RULES = [
    Rename("encoder.input_proj.{i}.conv.{p}", "model.encoder_input_proj.{i}.0.{p}"),
    Rename("encoder.input_proj.{i}.norm.{p}", "model.encoder_input_proj.{i}.1.{p}"),
    Rename(f"{_AIFI}.self_attn.out_proj.{{p}}", f"model.{_AIFI}.self_attn.out_proj.{{p}}"),
    Rename(f"{_AIFI}.linear1.{{p}}", f"model.{_AIFI}.fc1.{{p}}"),
    Rename(f"{_AIFI}.linear2.{{p}}", f"model.{_AIFI}.fc2.{{p}}"),
    Rename(f"{_AIFI}.norm1.{{p}}", f"model.{_AIFI}.self_attn_layer_norm.{{p}}"),
    Rename(f"{_AIFI}.norm2.{{p}}", f"model.{_AIFI}.final_layer_norm.{{p}}"),
]

DFINE_ENCODER_RULES = [
    *(
        Rename(f"encoder.{kind}_blocks.{{i}}.{ours}.{{m*}}", f"model.encoder.{kind}_blocks.{{i}}.{hf}.{{m*}}")
        for kind in ("fpn", "pan")
        for ours, hf in (("cv1", "conv1"), ("cv2.0", "csp_rep1"), ("cv2.1", "conv2"), ("cv3.0", "csp_rep2"),
                         ("cv3.1", "conv3"), ("cv4", "conv4"))
    ),
    Rename("encoder.downsample_convs.{i}.0.cv{n}.{m*}", "model.encoder.downsample_convs.{i}.conv{n}.{m*}"),
]

ENCODER_REST = [Rename("encoder.{m*}", "model.encoder.{m*}")]

_LAYER = "decoder.decoder.layers.{i}"
_HF_LAYER = "model.decoder.layers.{i}"
DECODER_RULES = [
    Rename("decoder.input_proj.{i}.conv.{p}", "model.decoder_input_proj.{i}.0.{p}"),
    Rename("decoder.input_proj.{i}.norm.{p}", "model.decoder_input_proj.{i}.1.{p}"),
    Rename(f"{_LAYER}.self_attn.out_proj.{{p}}", f"{_HF_LAYER}.self_attn.out_proj.{{p}}"),
    Rename(f"{_LAYER}.norm1.{{p}}", f"{_HF_LAYER}.self_attn_layer_norm.{{p}}"),
    Rename(f"{_LAYER}.norm2.{{p}}", f"{_HF_LAYER}.encoder_attn_layer_norm.{{p}}"),
    Rename(f"{_LAYER}.norm3.{{p}}", f"{_HF_LAYER}.final_layer_norm.{{p}}"),
    Rename(f"{_LAYER}.linear1.{{p}}", f"{_HF_LAYER}.fc1.{{p}}"),
    Rename(f"{_LAYER}.linear2.{{p}}", f"{_HF_LAYER}.fc2.{{p}}"),
    Rename(f"{_LAYER}.cross_attn.{{m*}}", f"{_HF_LAYER}.encoder_attn.{{m*}}"),
    Rename(f"{_LAYER}.gateway.{{m*}}", f"{_HF_LAYER}.gateway.{{m*}}"),
    Rename("decoder.decoder.lqe_layers.{m*}", "model.decoder.lqe_layers.{m*}"),
    Rename("decoder.dec_score_head.{m*}", "model.decoder.class_embed.{m*}"),
    Rename("decoder.dec_bbox_head.{m*}", "model.decoder.bbox_embed.{m*}"),
    Rename("decoder.pre_bbox_head.{m*}", "model.decoder.pre_bbox_head.{m*}"),
    Rename("decoder.query_pos_head.{m*}", "model.decoder.query_pos_head.{m*}"),
    Rename("decoder.denoising_class_embed.{m*}", "model.denoising_class_embed.{m*}"),
    Rename("decoder.enc_output.proj.{p}", "model.enc_output.0.{p}"),
    Rename("decoder.enc_output.norm.{p}", "model.enc_output.1.{p}"),
    Rename("decoder.enc_score_head.{m*}", "model.enc_score_head.{m*}"),
    Rename("decoder.enc_bbox_head.{m*}", "model.enc_bbox_head.{m*}"),
    Rename("decoder.up", "model.decoder.up"),
    Rename("decoder.reg_scale", "model.decoder.reg_scale"),
]

FUSED = [
    FusedAttention(f"{_AIFI}.self_attn.in_proj_{{p}}", f"model.{_AIFI}.self_attn.{{qkv}}_proj.{{p}}"),
    FusedAttention(f"{_LAYER}.self_attn.in_proj_{{p}}", f"{_HF_LAYER}.self_attn.{{qkv}}_proj.{{p}}"),
]

# RT-DETRv2's deformable attention calls the per-point scale n_points_scale; it must win over the generic rule.
RTDETRV2_SPECIAL = [Rename(f"{_LAYER}.cross_attn.num_points_scale", f"{_HF_LAYER}.encoder_attn.n_points_scale")]

RULES = {
    DFINE: HGNETV2_RULES + ENCODER_RULES + DFINE_ENCODER_RULES + ENCODER_REST + DECODER_RULES,
    RTDETRV2: PRESNET_RULES + ENCODER_RULES + ENCODER_REST + RTDETRV2_SPECIAL + DECODER_RULES,
}

# Our keys whose value the model derives from others or from the input size: never written to HF.
DERIVED_KEYS = ("decoder.anchors", "decoder.valid_mask", "decoder.decoder.up", "decoder.decoder.reg_scale")

# transformers >= 5 in-memory names -> the on-disk names the rules above use.
HF_ALIASES = [
    (re.compile(r"\.o_proj\."), ".out_proj."),
    (re.compile(r"(layers\.\d+)\.mlp\.layers\.0\."), r"\1.fc1."),
    (re.compile(r"(layers\.\d+)\.mlp\.layers\.1\."), r"\1.fc2."),
    (re.compile(r"(layers\.\d+)\.mlp\.fc([12])\."), r"\1.fc\2."),
    (re.compile(r"^model\.encoder\.aifi\."), "model.encoder.encoder."),
]


def _compile(template: str) -> re.Pattern:
    pieces = []
    for piece in re.split(r"(\{\w+\*?\})", template):
        hole = re.fullmatch(r"\{(\w+)(\*?)\}", piece)
        if hole:
            pieces.append(f"(?P<{hole[1]}>{'.+' if hole[2] else '[^.]+'})")
        else:
            pieces.append(re.escape(piece))
    return re.compile("".join(pieces))


def _fill(template: str, values: dict) -> str:
    return re.sub(r"\{(\w+)\*?\}", lambda m: values[m[1]], template)


def _rename(key: str, rules: list[Rename], to_hf: bool) -> str | None:
    for rule in rules:
        source, target = (rule.ours, rule.hf) if to_hf else (rule.hf, rule.ours)
        match = _compile(source).fullmatch(key)
        if match:
            return _fill(target, match.groupdict())
    return None


def family_of_config(cfg: dict) -> str:
    """``dfine`` or ``rtdetrv2``, from the decoder type in one of our configs."""
    decoder = cfg.get("model", {}).get("decoder", {}).get("type")
    families = {"DFINETransformer": DFINE, "RTDETRTransformerv2": RTDETRV2}
    if decoder not in families:
        raise ConversionError(f"config model.decoder.type {decoder!r}: only {sorted(families)} convert to transformers")
    return families[decoder]


def state_dict_to_hf(state: dict, family: str, freeze_backbone_norm: bool = True) -> dict[str, torch.Tensor]:
    """Our state dict -> the tensors of an HF ``model.safetensors`` (on-disk names; see the module table).

    Every tensor is a fresh contiguous copy (safetensors refuses shared storage). Raises ConversionError
    listing every key no rule maps."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state.items():
        if key in DERIVED_KEYS:
            continue
        if key.endswith(".num_batches_tracked") and key.startswith("backbone.") and freeze_backbone_norm:
            continue
        targets = _split_fused(key, tensor)
        if targets is None:
            hf_key = _rename(key, RULES[family], to_hf=True)
            if hf_key is None:
                unmapped.append(key)
                continue
            if key == "decoder.reg_scale":
                tensor = tensor.to(torch.float32)
            targets = {hf_key: tensor}
        for hf_key, value in targets.items():
            if hf_key in out:
                raise ConversionError(f"two of our keys map to {hf_key} (the second is {key})")
            out[hf_key] = value.detach().to("cpu").clone().contiguous()
    if unmapped:
        raise ConversionError(f"{len(unmapped)} keys have no Hugging Face name: {', '.join(unmapped[:20])}")
    return out


def _split_fused(key: str, tensor: torch.Tensor) -> dict | None:
    for rule in FUSED:
        match = _compile(rule.ours).fullmatch(key)
        if match:
            if tensor.shape[0] % 3:
                raise ConversionError(f"{key}: fused attention projection of shape {list(tensor.shape)} is not 3 x d")
            parts = tensor.chunk(3, dim=0)
            return {_fill(rule.hf, {**match.groupdict(), "qkv": name}): part for name, part in zip("qkv", parts)}
    return None


def state_dict_from_hf(hf_state: dict, family: str, template: dict) -> dict[str, torch.Tensor]:
    """HF tensors (on-disk or transformers-5 names) -> our state dict, shaped like ``template`` (a freshly
    built model's state dict, which supplies the derived buffers). Raises ConversionError listing every HF key
    no rule maps and every key of ours left unfilled."""
    hf_state = _normalise_hf_names(hf_state)
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in hf_state.items():
        joined = _fused_part(key)
        if joined is not None:
            ours, qkv = joined
            fused.setdefault(ours, {})[qkv] = tensor
            continue
        ours = _rename(key, RULES[family], to_hf=False)
        if ours is None:
            unmapped.append(key)
            continue
        out[ours] = tensor
    for ours, parts in fused.items():
        if set(parts) != set("qkv"):
            raise ConversionError(f"{ours}: found only the {sorted(parts)} projections of q, k, v")
        out[ours] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unmapped:
        raise ConversionError(f"{len(unmapped)} Hugging Face keys have no dfine name: {', '.join(unmapped[:20])}")
    for key in ("decoder.up", "decoder.reg_scale"):
        alias = "decoder.decoder." + key.split(".", 1)[1]
        if key in out and alias in template:
            out[alias] = out[key]
    if "decoder.reg_scale" in out:
        value = out["decoder.reg_scale"]
        wanted = template.get("decoder.reg_scale", value).dtype
        if not wanted.is_floating_point and not torch.equal(value, value.round()):
            raise ConversionError(f"reg_scale {value.tolist()} is not an integer, as this model stores it")
        out["decoder.reg_scale"] = value.to(wanted)
        if "decoder.decoder.reg_scale" in out:
            out["decoder.decoder.reg_scale"] = out["decoder.reg_scale"]
    for key, value in template.items():
        if key not in out and (key in DERIVED_KEYS or key.endswith(".num_batches_tracked")):
            out[key] = value.clone() if key in DERIVED_KEYS else torch.zeros_like(value)
    missing = [k for k in template if k not in out]
    if missing:
        raise ConversionError(f"the Hugging Face weights lack {len(missing)} tensors of the model: {', '.join(missing[:20])}")
    return {k: out[k] for k in template} | {k: v for k, v in out.items() if k not in template}


def _fused_part(key: str) -> tuple[str, str] | None:
    for rule in FUSED:
        match = _compile(rule.hf).fullmatch(key)
        if match and match["qkv"] in ("q", "k", "v"):
            values = match.groupdict()
            return _fill(rule.ours, values), values["qkv"]
    return None


def _normalise_hf_names(hf_state: dict) -> dict:
    """Map transformers-5 in-memory names to on-disk names and fold the top-level ``class_embed``/``bbox_embed``
    copies (tied to ``model.decoder.*``) into one."""
    out = {}
    for key, tensor in hf_state.items():
        for pattern, replacement in HF_ALIASES:
            key = pattern.sub(replacement, key)
        out[key] = tensor
    for key in [k for k in out if k.startswith(("class_embed.", "bbox_embed."))]:
        inner = "model.decoder." + key
        tensor = out.pop(key)
        if inner not in out:
            out[inner] = tensor
        elif not torch.equal(out[inner], tensor):
            raise ConversionError(f"{key} and {inner} differ; transformers ties them, so the file is inconsistent")
    return out


def class_names_for(cfg: dict, classes: dict | None) -> list[str]:
    """One name per label: the checkpoint's ``classes`` names, COCO's for COCO-remapped models, else LABEL_i."""
    num_classes = int(cfg["model"]["decoder"]["num_classes"])
    known = LabelMap.from_checkpoint(classes, cfg)  # stored names, else COCO's for a remapped model
    names = known.names if (classes or {}).get("names") or len(known.names) == num_classes else []
    if len(names) != num_classes:
        if names:
            logger.warning("%d class names for %d classes: writing LABEL_i names instead", len(names), num_classes)
        names = [f"LABEL_{i}" for i in range(num_classes)]
    return names


def convert_to_hf(cfg: dict, state: dict, out_dir: str | os.PathLike, classes: dict | None = None, verify: bool = True) -> Path:
    """Write a transformers model folder (config.json, model.safetensors, preprocessor_config.json) for the
    model of our resolved config ``cfg`` with weights ``state`` (our key names, e.g. a checkpoint's EMA).

    With ``verify`` the folder is loaded back with transformers and any missing, unexpected or mis-shaped
    key raises ConversionError."""
    import transformers
    from safetensors.torch import save_file

    family = family_of_config(cfg)
    hf_config = hf_config_from_ours(cfg, family, class_names_for(cfg, classes))
    hf_config.architectures = ["DFineForObjectDetection" if family == DFINE else "RTDetrV2ForObjectDetection"]
    tensors = state_dict_to_hf(state, family, freeze_backbone_norm=hf_config.freeze_backbone_batch_norms)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    height, width = cfg.get("eval_spatial_size") or [640, 640]
    # The reference feeds images resized to the model size and scaled to [0, 1], without mean/std.
    processor = transformers.RTDetrImageProcessor(
        do_resize=True, size={"height": int(height), "width": int(width)}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=False, do_pad=False,
    )
    processor.save_pretrained(out)
    if verify:
        _verify_loads(out, family)
    logger.info("wrote %s (%d tensors, %s)", out, len(tensors), hf_config.model_type)
    return out


def _verify_loads(folder: Path, family: str) -> None:
    import transformers

    cls = transformers.DFineForObjectDetection if family == DFINE else transformers.RTDetrV2ForObjectDetection
    _, info = cls.from_pretrained(folder, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ConversionError(f"transformers does not load {folder} cleanly: {problems}")


def read_hf_folder(hf_dir: str | os.PathLike) -> tuple[object, dict[str, torch.Tensor]]:
    """(transformers config, tensors) of a local model folder; sharded safetensors and pytorch_model.bin too."""
    import transformers
    from safetensors.torch import load_file

    folder = Path(hf_dir)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} is not a transformers model folder (no config.json); download it first")
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    files = sorted(folder.glob("model*.safetensors"))
    if files:
        tensors = {}
        for file in files:
            tensors.update(load_file(str(file)))
    elif (folder / "pytorch_model.bin").is_file():
        tensors = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ConversionError(f"{folder} has no model*.safetensors nor pytorch_model.bin")
    return hf_config, tensors


def convert_from_hf(hf_dir: str | os.PathLike, base_config: str | os.PathLike | None = None,
                    configs_dir: str | os.PathLike | None = None) -> dict:
    """Read a local transformers folder into our checkpoint format ``{"model", "config", "classes", ...}``.

    The model section of the stored config is derived from the folder's config.json; the training settings
    come from ``base_config`` (a YAML file), by default the matching size's COCO file in ``configs_dir``."""
    import dfine
    from dfine.checkpoint import load_state_dict_checked

    hf_config, tensors = read_hf_folder(hf_dir)
    family = family_of_hf_config(hf_config)
    if base_config is None:
        if configs_dir is None:
            raise ConversionError("give the YAML config whose training settings the checkpoint should carry")
        base_config = Path(configs_dir) / base_config_name(hf_config)
    names = [str(hf_config.id2label.get(i, f"LABEL_{i}")) for i in range(hf_config.num_labels)]
    coco = _is_coco(names)
    overrides = overrides_from_hf(hf_config) + [f"remap_mscoco_category={json.dumps(coco)}"]
    cfg = dfine.load_config(base_config, overrides)
    model = dfine.build_model(cfg, load_pretrained=False)
    state = state_dict_from_hf(tensors, family, model.state_dict())
    try:
        load_state_dict_checked(model, state, str(hf_dir), strict=True)
    except CheckpointError as err:
        raise ConversionError(f"{hf_dir} does not fit the model built from {base_config}: {err}") from None
    classes = LabelMap(names, {}, coco).to_checkpoint()
    return {"model": model.state_dict(), "config": cfg, "classes": classes, "source": f"transformers:{hf_dir}"}


def _is_coco(names: list[str]) -> bool:
    from dfine.data.coco_categories import COCO_CLASS_NAMES

    return len(names) == len(COCO_CLASS_NAMES) and [n.lower() for n in names] == [n.lower() for n in COCO_CLASS_NAMES]
