"""Model settings between our config sections and transformers' DFineConfig / RTDetrV2Config.

Only the architecture travels; the training settings (data, optimizer, schedule, criterion) of a config
read from the HF side come from one of our YAML files (``base_config_name`` picks the matching size).
transformers is imported inside the functions: the core never needs it.
"""

from __future__ import annotations

import json

from dfine.models.backbones.hgnetv2 import ARCHS
from dfine.models.backbones.presnet import BLOCKS_PER_STAGE, STAGE_WIDTHS

DFINE, RTDETRV2 = "dfine", "rtdetrv2"  # the two model families transformers implements


class ConversionError(RuntimeError):
    """A checkpoint or folder that cannot be converted; the message names the keys or settings at fault."""


# our section.key -> HF attribute, for settings that are copied as they are
ENCODER_FIELDS = {
    "in_channels": "encoder_in_channels", "feat_strides": "feat_strides", "hidden_dim": "encoder_hidden_dim",
    "use_encoder_idx": "encode_proj_layers", "num_encoder_layers": "encoder_layers",
    "nhead": "encoder_attention_heads", "dim_feedforward": "encoder_ffn_dim", "dropout": "dropout",
    "enc_act": "encoder_activation_function", "expansion": "hidden_expansion", "act": "activation_function",
    "pe_temperature": "positional_encoding_temperature",
}
DECODER_FIELDS = {
    "hidden_dim": "d_model", "feat_channels": "decoder_in_channels", "num_levels": "num_feature_levels",
    "num_layers": "decoder_layers", "nhead": "decoder_attention_heads", "dim_feedforward": "decoder_ffn_dim",
    "num_queries": "num_queries", "num_denoising": "num_denoising", "label_noise_ratio": "label_noise_ratio",
    "box_noise_scale": "box_noise_scale", "activation": "decoder_activation_function",
    "cross_attn_method": "decoder_method", "learn_query_content": "learn_initial_query",
}
DFINE_DECODER_FIELDS = {"eval_idx": "eval_idx", "layer_scale": "layer_scale", "reg_max": "max_num_bins", "reg_scale": "reg_scale"}
LOSS_FIELDS = {"loss_vfl": "weight_loss_vfl", "loss_bbox": "weight_loss_bbox", "loss_giou": "weight_loss_giou",
               "loss_fgl": "weight_loss_fgl", "loss_ddf": "weight_loss_ddf"}
MATCHER_FIELDS = {"cost_class": "matcher_class_cost", "cost_bbox": "matcher_bbox_cost", "cost_giou": "matcher_giou_cost"}


def hf_config_from_ours(cfg: dict, family: str, class_names: list[str]):
    """A transformers DFineConfig / RTDetrV2Config describing the model of our resolved ``cfg``."""
    import transformers

    model = cfg["model"]
    backbone, encoder, decoder = model["backbone"], model["encoder"], model["decoder"]
    if decoder.get("query_select_method", "default") != "default":
        raise ConversionError(f"query_select_method {decoder['query_select_method']!r}: transformers has only 'default'")
    kwargs = {hf: encoder[ours] for ours, hf in ENCODER_FIELDS.items() if ours in encoder}
    kwargs |= {hf: decoder[ours] for ours, hf in DECODER_FIELDS.items() if ours in decoder}
    kwargs["depth_mult"] = encoder.get("depth_mult", 1.0)
    num_points = decoder.get("num_points", 4)
    # HF computes anchors and the encoder position embedding from each input's size (same values at the
    # size we cache them for, and valid at any other).
    kwargs |= {"anchor_image_size": None, "eval_size": None, "freeze_backbone_batch_norms": bool(backbone.get("freeze_norm", True))}
    weights = cfg.get("criterion", {}).get("weight_dict", {})
    kwargs |= {hf: float(weights[ours]) for ours, hf in LOSS_FIELDS.items() if ours in weights}
    matcher = cfg.get("criterion", {}).get("matcher", {})
    kwargs |= {hf: float(matcher["weight_dict"][ours]) for ours, hf in MATCHER_FIELDS.items() if ours in matcher.get("weight_dict", {})}
    labels = {"id2label": dict(enumerate(class_names)), "label2id": {n: i for i, n in enumerate(class_names)}}
    if family == DFINE:
        kwargs |= {hf: decoder[ours] for ours, hf in DFINE_DECODER_FIELDS.items() if ours in decoder}
        kwargs["reg_scale"] = float(kwargs.get("reg_scale", 4.0))
        kwargs["decoder_n_points"] = list(num_points) if isinstance(num_points, (list, tuple)) else num_points
        return transformers.DFineConfig(backbone_config=_hgnetv2_config(backbone), **kwargs, **labels)
    points = set(num_points) if isinstance(num_points, (list, tuple)) else {num_points}
    if len(points) != 1:
        raise ConversionError(f"num_points {num_points}: transformers' RT-DETRv2 takes one count for every level")
    if decoder.get("eval_idx", -1) not in (-1, decoder.get("num_layers", 6) - 1):
        raise ConversionError("transformers' RT-DETRv2 predicts from the last decoder layer; eval_idx must be -1")
    kwargs |= {"decoder_n_points": points.pop(), "decoder_n_levels": decoder.get("num_levels", 3)}
    return transformers.RTDetrV2Config(backbone_config=_presnet_config(backbone), **kwargs, **labels)


def _hgnetv2_config(backbone: dict):
    import transformers

    arch = ARCHS[backbone.get("name", "B4")]
    stages = list(zip(*arch["stages"]))  # per field, one value per stage
    return transformers.HGNetV2Config(
        stem_channels=list(arch["stem"]), stage_in_channels=list(stages[0]), stage_mid_channels=list(stages[1]),
        stage_out_channels=list(stages[2]), stage_num_blocks=list(stages[3]), stage_downsample=list(stages[4]),
        stage_light_block=list(stages[5]), stage_kernel_size=list(stages[6]), stage_numb_of_layers=list(stages[7]),
        hidden_sizes=list(stages[2]), embedding_size=arch["stem"][2], depths=list(stages[3]),
        out_indices=[i + 1 for i in backbone.get("return_idx", [1, 2, 3])],
        use_learnable_affine_block=bool(backbone.get("use_lab", False)),
    )


def _presnet_config(backbone: dict):
    import transformers

    depth = backbone["depth"]
    if backbone.get("variant", "d") != "d":
        raise ConversionError(f"PResNet variant {backbone['variant']!r}: transformers' RT-DETR ResNet is the 'd' variant")
    expansion = 1 if depth < 50 else 4
    return transformers.RTDetrResNetConfig(
        depths=list(BLOCKS_PER_STAGE[depth]), hidden_sizes=[w * expansion for w in STAGE_WIDTHS], embedding_size=64,
        layer_type="basic" if depth < 50 else "bottleneck", out_indices=[i + 1 for i in backbone.get("return_idx", [1, 2, 3])],
    )


def family_of_hf_config(hf_config) -> str:
    families = {"d_fine": DFINE, "rt_detr_v2": RTDETRV2}
    if hf_config.model_type not in families:
        raise ConversionError(f"model_type {hf_config.model_type!r}: only {sorted(families)} convert to dfine")
    return families[hf_config.model_type]


def overrides_from_hf(hf_config) -> list[str]:
    """``a.b=value`` overrides that make one of our configs describe the model of ``hf_config``."""
    family = family_of_hf_config(hf_config)
    get = hf_config.__getattribute__
    settings: dict[str, object] = {"num_classes": hf_config.num_labels}
    for ours, hf in ENCODER_FIELDS.items():
        settings[f"model.encoder.{ours}"] = get(hf)
    settings["model.encoder.depth_mult"] = hf_config.depth_mult if family == DFINE else 1.0
    for ours, hf in DECODER_FIELDS.items():
        settings[f"model.decoder.{ours}"] = get(hf)
    settings["model.decoder.feat_strides"] = list(hf_config.feat_strides)
    settings["model.backbone.freeze_norm"] = bool(hf_config.freeze_backbone_batch_norms)
    backbone = hf_config.backbone_config
    settings["model.backbone.return_idx"] = [i - 1 for i in backbone.out_indices]
    if family == DFINE:
        for ours, hf in DFINE_DECODER_FIELDS.items():
            settings[f"model.decoder.{ours}"] = get(hf)
        if float(hf_config.reg_scale).is_integer():  # the reference stores reg_scale as an integer
            settings["model.decoder.reg_scale"] = int(hf_config.reg_scale)
        points = hf_config.decoder_n_points
        settings["model.decoder.num_points"] = list(points) if isinstance(points, (list, tuple)) else [points] * hf_config.num_feature_levels
        settings["model.backbone.name"] = _hgnetv2_name(backbone)
        settings["model.backbone.use_lab"] = bool(backbone.use_learnable_affine_block)
    else:
        settings["model.decoder.num_points"] = [hf_config.decoder_n_points] * hf_config.decoder_n_levels
        settings["model.backbone.depth"] = _presnet_depth(backbone)
    return [f"{key}={json.dumps(value)}" for key, value in settings.items()]


def _hgnetv2_name(backbone) -> str:
    wanted = (tuple(backbone.stem_channels), [tuple(s) for s in zip(
        backbone.stage_in_channels, backbone.stage_mid_channels, backbone.stage_out_channels, backbone.stage_num_blocks,
        backbone.stage_downsample, backbone.stage_light_block, backbone.stage_kernel_size, backbone.stage_numb_of_layers)])
    for name, arch in ARCHS.items():
        if (tuple(arch["stem"]), [tuple(s) for s in arch["stages"]]) == wanted:
            return name
    raise ConversionError(f"the HGNetV2 backbone in this folder matches none of {sorted(ARCHS)} (stem {wanted[0]})")


def _presnet_depth(backbone) -> int:
    for depth, blocks in BLOCKS_PER_STAGE.items():
        if list(blocks) == list(backbone.depths) and (backbone.layer_type == "basic") == (depth < 50):
            return depth
    raise ConversionError(f"the ResNet backbone ({backbone.layer_type}, depths {backbone.depths}) is none of {sorted(BLOCKS_PER_STAGE)}")


def base_config_name(hf_config) -> str:
    """The file in configs/ whose training settings suit the model of ``hf_config`` (its size's COCO config)."""
    if family_of_hf_config(hf_config) == RTDETRV2:
        return f"rtdetrv2_r{_presnet_depth(hf_config.backbone_config)}vd_coco.yml"
    name = _hgnetv2_name(hf_config.backbone_config)
    if name == "B0":
        return "dfine_n_coco.yml" if hf_config.num_feature_levels == 2 else "dfine_s_coco.yml"
    sizes = {"B2": "m", "B4": "l", "B5": "x"}
    return f"dfine_{sizes.get(name, 'l')}_coco.yml"
