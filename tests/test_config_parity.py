"""Config parity: each of our configs against the reference config it reproduces, both resolved.

The reference side is ``../shared/reference/configs`` (every reference experiment config resolved by the
reference's own loader, dumped as JSON; D-FINE at 4a1f73a, RT-DETRv2 from lyuwenyu/RT-DETR). From each file the
test reads the settings that decide a run and names them as our configs do (``recipe_items``): epochs and the
no-augmentation phase, optimizer groups, schedules, EMA, batches, multi-scale, transforms, and every argument of
the backbone, encoder, decoder, criterion, matcher and postprocessor. Each item must equal our resolved config
(a key our file leaves out counts with our constructor's default). Every component argument our files state
that the reference leaves to its defaults must equal the reference constructor's default
(``REFERENCE_DEFAULTS``) or be one of our own settings (``OUR_OWN_KEYS``). The only differences allowed are in
``DELIBERATE``, each with its reason; an entry there that no pair uses any more fails the test.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import json
from pathlib import Path

import pytest

import dfine
from dfine.data.collate import generate_scales
from dfine.registry import find_component

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
REFERENCE = REPO.parent / "shared" / "reference" / "configs"

SIZES = "nsmlx"

# -- which reference file each config reproduces ---------------------------------------------------------------
PAIRS: dict[str, str] = {
    **{f"dfine_{s}_coco.yml": f"dfine/dfine_hgnetv2_{s}_coco.json" for s in SIZES},
    **{f"dfine_{s}_obj365.yml": f"dfine/objects365__dfine_hgnetv2_{s}_obj365.json" for s in SIZES},
    **{f"dfine_{s}_obj2coco.yml": f"dfine/objects365__dfine_hgnetv2_{s}_obj2coco.json" for s in SIZES},
    **{f"dfine_{s}_custom.yml": f"dfine/custom__dfine_hgnetv2_{s}_custom.json" for s in SIZES},
    **{f"dfine_{s}_obj2custom.yml": f"dfine/custom__objects365__dfine_hgnetv2_{s}_obj2custom.json" for s in "smlx"},
    **{f"dfine_{s}_crowdhuman.yml": f"dfine/crowdhuman__dfine_hgnetv2_{s}_ch.json" for s in SIZES},
    "rtdetrv2_r18vd_coco.yml": "rtdetrv2/rtdetrv2_r18vd_120e_coco.json",
    "rtdetrv2_r34vd_coco.yml": "rtdetrv2/rtdetrv2_r34vd_120e_coco.json",
    "rtdetrv2_r50vd_m_coco.yml": "rtdetrv2/rtdetrv2_r50vd_m_7x_coco.json",
    "rtdetrv2_r50vd_coco.yml": "rtdetrv2/rtdetrv2_r50vd_6x_coco.json",
    "rtdetrv2_r101vd_coco.yml": "rtdetrv2/rtdetrv2_r101vd_6x_coco.json",
    "rtdetrv2_r18vd_dsp_coco.yml": "rtdetrv2/rtdetrv2_r18vd_dsp_3x_coco.json",
    "rtdetrv2_r34vd_dsp_coco.yml": "rtdetrv2/rtdetrv2_r34vd_dsp_1x_coco.json",
    "rtdetrv2_r50vd_m_dsp_coco.yml": "rtdetrv2/rtdetrv2_r50vd_m_dsp_3x_coco.json",
    "rtdetrv2_r50vd_dsp_coco.yml": "rtdetrv2/rtdetrv2_r50vd_dsp_1x_coco.json",
    **{f"rtdetrv2_r18vd_sp{k}_coco.yml": f"rtdetrv2/rtdetrv2_r18vd_sp{k}_120e_coco.json" for k in (1, 2, 3)},
    "rtdetrv2_r18vd_voc.yml": "rtdetrv2/rtdetrv2_r18vd_120e_voc.json",
}

# Our configs that reproduce no reference experiment (the README says the same).
NO_REFERENCE = {
    "dfine_n_demo.yml": "CPU demo on the built-in synthetic data",
    "rtdetrv2_r18vd_demo.yml": "CPU smoke test of the RT-DETRv2 family on the synthetic data",
}
# DEIM configs are checked against the DEIM reference by their own tests.
OTHER_FAMILIES = ("deim_*.yml",)

# Reference configs we do not reproduce, and why (the README says the same).
NOT_REPRODUCED = {
    **{f"rtdetrv2/rtdetrv2_hgnetv2_{s}_6x_coco.json": "RT-DETR's HGNetV2 L/X/H (its own module layout and ImageNet "
       "weights PPHGNetV2_{L,X,H}_ssld) is not our HGNetV2 B0..B6" for s in "lxh"},
}

# -- reference names -> ours ----------------------------------------------------------------------------------
# Component classes: the reference's name -> ours. RT-DETRv2's detector, criterion and postprocessor are the
# framework's shared classes, configured for RT-DETRv2 (criterion: use_union_matching false, VFL + boxes).
CLASS_NAMES = {"HGNetv2": "HGNetV2", "RTDETR": "DFINE", "RTDETRCriterionv2": "DFINECriterion",
               "RTDETRPostProcessor": "DFINEPostProcessor"}
# Top-level keys (reference -> ours); values compared as they are.
RUNTIME_KEYS = {"epochs": "epochs", "epoches": "epochs", "num_classes": "num_classes",
                "eval_spatial_size": "eval_spatial_size", "clip_max_norm": "clip_max_norm", "use_amp": "use_amp",
                "use_ema": "use_ema", "sync_bn": "sync_bn", "find_unused_parameters": "find_unused_parameters",
                "checkpoint_freq": "checkpoint_freq", "print_freq": "print_freq"}
# Reference keys that hold file locations or logging names, not the recipe: not compared. (`tuning`: the dsp
# configs download their start weights from a URL; ours take the file with -t, named in each config's header.
# `scaler`: the reference's GradScaler follows use_amp, which is compared. `task`: always `detection`, and nothing of
# ours reads it.)
NOT_COMPARED = {"task", "output_dir", "img_folder", "ann_file", "root", "label_file", "local_model_dir", "exp_name",
                "project_name", "use_wandb", "evaluator", "__include__", "scaler", "tuning"}
# Arguments the reference takes from the top level of its config (`__share__`), overriding the section.
SHARED = {"DFINETransformer": ("num_classes", "eval_spatial_size"),
          "RTDETRTransformerv2": ("num_classes", "eval_spatial_size"), "HybridEncoder": ("eval_spatial_size",),
          "DFINECriterion": ("num_classes",), "RTDETRCriterionv2": ("num_classes",),
          "HungarianMatcher": ("use_focal_loss",),
          "DFINEPostProcessor": ("num_classes", "use_focal_loss", "num_top_queries", "remap_mscoco_category"),
          "RTDETRPostProcessor": ("num_classes", "use_focal_loss", "num_top_queries", "remap_mscoco_category")}
# Constructor defaults of the reference classes (read from the reference sources), for the arguments our files
# state and the reference files leave out. Keyed by reference class, or `family:class` where the two references
# have different classes of one name.
REFERENCE_DEFAULTS = {
    "HGNetv2": {"use_lab": False, "freeze_stem_only": True, "freeze_at": 0, "freeze_norm": True},
    "rtdetrv2:HybridEncoder": {"version": "v2"},      # D-FINE's HybridEncoder has no version argument
    "DFINECriterion": {"boxes_weight_format": None, "share_matched_indices": False},
    "RTDETRCriterionv2": {"boxes_weight_format": None, "share_matched_indices": False},
    "ModelEMA": {"start": 0},
    "DFINEPostProcessor": {"remap_mscoco_category": False},
    "RTDETRPostProcessor": {"remap_mscoco_category": False},
}
# Values that mean the same under another name.
SAME_VALUE = {("model.encoder.version", "v2"): "rtdetr"}   # our HybridEncoder calls RT-DETR's v2 encoder `rtdetr`
# Arguments that exist only in our classes, with what they stand for in the reference.
OUR_OWN_KEYS = {
    "criterion.use_union_matching": "D-FINE's criterion always matches on the union of all layers (GO-LSD), "
                                    "RT-DETRv2's never (compared through FAMILY_FACTS)",
    "ema.restart_decay": "the reference's train_dataloader.collate_fn.ema_restart_decay (compared as an item)",
}
# Family facts that live in the reference's solver code, not in its configs.
FAMILY_FACTS = {
    "dfine": {"reload_best_at_stop_epoch": True, "criterion.use_union_matching": True},
    "rtdetrv2": {"reload_best_at_stop_epoch": False, "criterion.use_union_matching": False},
}

# Differences we mean: (our config pattern, item, reason).
DELIBERATE = [
    ("*", "val_dataloader.dataset.transforms.ops",
     "ours ends with ConvertBoxes(cxcywh, normalize) so that a validation loss can be computed; the predictions "
     "and the evaluation are unchanged"),
    ("rtdetrv2_r18vd_voc.yml", "train_dataloader.dataset.type",
     "the reference reads VOC XML (VOCDetection); ours reads VOC converted to COCO json (see the config)"),
    ("rtdetrv2_r18vd_voc.yml", "val_dataloader.dataset.type", "as train_dataloader.dataset.type"),
    ("rtdetrv2_r18vd_voc.yml", "train_dataloader.dataset.return_masks", "CocoDetection's argument; VOCDetection has none"),
    ("rtdetrv2_r18vd_voc.yml", "val_dataloader.dataset.return_masks", "as train_dataloader.dataset.return_masks"),
]


def family(reference_name: str) -> str:
    return reference_name.split("/")[0]


def _number(value):
    """The reference reads `1e-4` (no dot) as a string; its value is the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def normalise(value):
    """Lists for tuples, numbers for numeric strings, recursively."""
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise(v) for v in value]
    return _number(value)


def same(a, b) -> bool:
    """Equal as config values: bools only equal bools, ints equal floats of the same value (exact: both are
    parsed from the same decimal text, e.g. 0.0000125 and 1.25e-05 give the same double)."""
    a, b = normalise(a), normalise(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def phase_start(epoch, epochs):
    """First epoch of the no-augmentation phase, or None when there is none (at or past the end)."""
    return None if epoch is None or epoch >= epochs else epoch


# -- the reference's recipe, in our names ----------------------------------------------------------------------


def recipe_items(ref: dict, fam: str) -> dict:
    """{our dotted name: reference value} for every setting of ``ref`` that decides the run."""
    items = {ours: ref[theirs] for theirs, ours in RUNTIME_KEYS.items() if theirs in ref}
    items["remap_mscoco_category"] = ref.get("remap_mscoco_category", False)
    epochs = items["epochs"]
    train = ref["train_dataloader"]
    collate = train["collate_fn"]
    policy = train["dataset"]["transforms"].get("policy") or {}
    stop = phase_start(policy.get("epoch"), epochs)
    items["stop_epoch"] = stop
    items["train_dataloader.dataset.transforms.policy.epoch"] = stop
    items["train_dataloader.dataset.transforms.policy.name"] = policy.get("name")
    items["train_dataloader.dataset.transforms.policy.ops"] = policy.get("ops")

    for key, value in ref["ema"].items():
        items[f"ema.{key}"] = value
    if stop is not None:
        # D-FINE switches the EMA decay at the phase start and restarts from best_stg1.pth; RT-DETRv2 does neither.
        items["ema.restart_decay"] = collate.get("ema_restart_decay", 0.9999) if fam == "dfine" else ref["ema"]["decay"]
    items.update(FAMILY_FACTS[fam] if stop is not None else
                 {k: v for k, v in FAMILY_FACTS[fam].items() if k != "reload_best_at_stop_epoch"})

    for section in ("optimizer", "lr_scheduler", "lr_warmup_scheduler"):
        for key, value in ref[section].items():
            items[f"{section}.{key}"] = value

    for split in ("train_dataloader", "val_dataloader"):
        loader = ref[split]
        for key in ("total_batch_size", "shuffle", "drop_last", "num_workers"):
            items[f"{split}.{key}"] = loader[key]
        items[f"{split}.collate_fn.type"] = loader["collate_fn"]["type"]
        dataset = loader["dataset"]
        items[f"{split}.dataset.type"] = CLASS_NAMES.get(dataset["type"], dataset["type"])
        items[f"{split}.dataset.return_masks"] = dataset.get("return_masks")
        items[f"{split}.dataset.transforms.type"] = dataset["transforms"]["type"]
        items[f"{split}.dataset.transforms.ops"] = dataset["transforms"]["ops"]

    # multi-scale: D-FINE names base size and repeat; RT-DETRv2 lists the scales
    scales = (generate_scales(collate.get("base_size", 640), collate["base_size_repeat"])
              if collate.get("base_size_repeat") is not None else None) if fam == "dfine" else collate.get("scales")
    items["multi_scale.scales"] = sorted(scales) if scales else None
    if scales:
        items["train_dataloader.collate_fn.stop_epoch"] = phase_start(collate.get("stop_epoch"), epochs)

    detector = ref["model"]
    items["model.type"] = CLASS_NAMES.get(detector, detector)
    for part, cls in ref[detector].items():
        items.update(component_items(ref, cls, f"model.{part}"))
    items.update(component_items(ref, ref["criterion"], "criterion"))
    items.update(component_items(ref, ref["postprocessor"], "postprocessor"))
    return items


# What recipe_items reads at each level of a reference config besides RUNTIME_KEYS, NOT_COMPARED and the
# component sections; any other key would be a setting this test does not see.
READ_KEYS = {
    "": {"remap_mscoco_category", "use_focal_loss", "ema", "optimizer", "lr_scheduler", "lr_warmup_scheduler",
         "train_dataloader", "val_dataloader", "model", "criterion", "postprocessor"},
    "loader": {"type", "dataset", "collate_fn", "total_batch_size", "shuffle", "drop_last", "num_workers"},
    "collate_fn": {"type", "base_size", "base_size_repeat", "stop_epoch", "ema_restart_decay", "scales"},
    "dataset": {"type", "return_masks", "transforms", "remap_mscoco_category"},
}


def unread_keys(ref: dict) -> list[str]:
    """Keys of ``ref`` that recipe_items neither compares nor lists as not compared."""
    sections = {ref["model"], ref["criterion"], ref["postprocessor"], *ref[ref["model"]].values()}
    unread = [k for k in ref if k not in READ_KEYS[""] | set(RUNTIME_KEYS) | NOT_COMPARED | sections]
    for split in ("train_dataloader", "val_dataloader"):
        loader = ref[split]
        unread += [f"{split}.{k}" for k in loader if k not in READ_KEYS["loader"]]
        unread += [f"{split}.collate_fn.{k}" for k in loader["collate_fn"] if k not in READ_KEYS["collate_fn"]]
        unread += [f"{split}.dataset.{k}" for k in loader["dataset"] if k not in READ_KEYS["dataset"] | NOT_COMPARED]
    return unread


def component_items(ref: dict, cls: str, prefix: str) -> dict:
    items = {f"{prefix}.type": CLASS_NAMES.get(cls, cls)}
    section = dict(ref.get(cls, {}))
    for key in SHARED.get(cls, ()):
        if key in ref:
            section[key] = ref[key]
    for key, value in section.items():
        if key in NOT_COMPARED or key == "type":
            continue
        if isinstance(value, dict) and "type" in value:   # a nested component (the matcher)
            items.update(component_items({**ref, value["type"]: value}, value["type"], f"{prefix}.{key}"))
        else:
            items[f"{prefix}.{key}"] = value
    return items


# -- ours ------------------------------------------------------------------------------------------------------

MISSING = object()


def constructor_default(node: dict, key: str):
    component = find_component(node.get("type", "")) if isinstance(node, dict) else None
    if component is None:
        return MISSING
    parameter = inspect.signature(component).parameters.get(key)
    return MISSING if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def our_value(cfg: dict, item: str):
    """Our resolved value for ``item`` (a constructor default where our file leaves the argument out)."""
    if item == "stop_epoch":
        return phase_start(cfg.get("stop_epoch", cfg["epochs"]), cfg["epochs"])
    if item in ("train_dataloader.collate_fn.stop_epoch", "train_dataloader.dataset.transforms.policy.epoch"):
        section, key = item.rsplit(".", 1)
        node = our_value(cfg, section)
        return phase_start(node.get(key) if isinstance(node, dict) else None, cfg["epochs"])
    if item == "multi_scale.scales":
        collate = cfg["train_dataloader"]["collate_fn"]
        repeat = collate.get("base_size_repeat")
        return sorted(generate_scales(collate.get("base_size", 640), repeat)) if repeat is not None else None
    node = cfg
    keys = item.split(".")
    for depth, key in enumerate(keys):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif depth == len(keys) - 1:
            return constructor_default(node, key)
        else:
            return MISSING
    return node


def our_stated_component_keys(cfg: dict) -> dict:
    """{dotted name: value} of every argument our config states for a model part, the criterion, the matcher,
    the postprocessor and the EMA."""
    sections = {f"model.{p}": cfg["model"][p] for p in ("backbone", "encoder", "decoder")}
    sections.update(criterion=cfg["criterion"], **{"criterion.matcher": cfg["criterion"]["matcher"]},
                    postprocessor=cfg["postprocessor"], ema=cfg["ema"])
    return {f"{prefix}.{k}": v for prefix, node in sections.items() for k, v in node.items()
            if k != "type" and not (isinstance(v, dict) and "type" in v)}   # the matcher is a section of its own


def reference_class_of(ref: dict, prefix: str) -> str:
    if prefix.startswith("model."):
        return ref[ref["model"]][prefix.split(".")[1]]
    if prefix == "criterion.matcher":
        return ref[ref["criterion"]]["matcher"]["type"]
    return {"criterion": ref.get("criterion"), "postprocessor": ref.get("postprocessor"), "ema": "ModelEMA"}[prefix]


@functools.lru_cache(maxsize=None)   # two tests read every pair; the result is not modified
def differences(config: str, ref_name: str) -> dict[str, str]:
    """{item: 'reference X, ours Y'} for every setting where ``config`` differs from ``ref_name``."""
    cfg = dfine.load_config(CONFIGS / config)
    ref = json.loads((REFERENCE / ref_name).read_text())
    fam = family(ref_name)
    expected = recipe_items(ref, fam)
    found = {key: "a reference setting this test does not read" for key in unread_keys(ref)}
    for item, theirs in expected.items():
        ours = our_value(cfg, item)
        theirs = renamed(item, theirs)
        if ours is MISSING or not same(theirs, ours):
            found[item] = f"reference {theirs!r}, ours {'(missing)' if ours is MISSING else repr(ours)}"
    for item, ours in our_stated_component_keys(cfg).items():
        if item in expected or item in OUR_OWN_KEYS:
            continue
        prefix, key = item.rsplit(".", 1)
        cls = reference_class_of(ref, prefix)
        defaults = REFERENCE_DEFAULTS.get(f"{fam}:{cls}", REFERENCE_DEFAULTS.get(cls, {}))
        if key not in defaults:
            found[item] = f"ours states {ours!r}; not a reference argument (add it to OUR_OWN_KEYS with a reason?)"
            continue
        theirs = renamed(item, defaults[key])
        if not same(theirs, ours):
            found[item] = f"reference default {defaults[key]!r}, ours {ours!r}"
    return found


def renamed(item: str, value):
    """The reference value under our name for it (SAME_VALUE), else the value itself."""
    return SAME_VALUE.get((item, value), value) if isinstance(value, (str, int, float, bool, type(None))) else value


def deliberate(config: str, item: str) -> str | None:
    for pattern, what, reason in DELIBERATE:
        if fnmatch.fnmatch(config, pattern) and what == item:
            return reason
    return None


# -- tests -----------------------------------------------------------------------------------------------------

needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"no reference configs at {REFERENCE}")


@needs_reference
@pytest.mark.parametrize("config", sorted(PAIRS))
def test_config_matches_its_reference(config):
    found = differences(config, PAIRS[config])
    unexplained = {k: v for k, v in found.items() if deliberate(config, k) is None}
    assert not unexplained, f"{config} vs {PAIRS[config]}:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(unexplained.items()))


@needs_reference
def test_every_config_and_every_reference_is_accounted_for():
    ours = {p.name for p in CONFIGS.glob("*.yml") if not any(fnmatch.fnmatch(p.name, g) for g in OTHER_FAMILIES)}
    assert ours - set(PAIRS) - set(NO_REFERENCE) == set(), "configs with no reference pairing or reason"
    assert set(PAIRS) - ours == set(), "PAIRS names configs that do not exist"
    references = {p.relative_to(REFERENCE).as_posix() for p in REFERENCE.glob("*/*.json")}
    assert references - set(PAIRS.values()) - set(NOT_REPRODUCED) == set(), "reference configs with no counterpart"
    assert set(PAIRS.values()) - references == set(), "PAIRS names reference files that do not exist"


@needs_reference
def test_every_deliberate_difference_is_still_a_difference():
    used = set()
    for config, ref_name in PAIRS.items():
        for item in differences(config, ref_name):
            for pattern, what, _ in DELIBERATE:
                if fnmatch.fnmatch(config, pattern) and what == item:
                    used.add((pattern, what))
    stale = [(p, w) for p, w, _ in DELIBERATE if (p, w) not in used]
    assert not stale, f"deliberate differences that no config has any more: {stale}"


def test_the_comparison_sees_a_wrong_value():
    """The comparison itself: a changed learning rate, stop epoch or decoder argument is reported."""
    ref = json.loads((REFERENCE / PAIRS["dfine_n_coco.yml"]).read_text()) if REFERENCE.is_dir() else None
    if ref is None:
        pytest.skip("no reference configs")
    cfg = dfine.load_config(CONFIGS / "dfine_n_coco.yml", ["optimizer.lr=0.0004", "stop_epoch=160",
                                                          "model.decoder.reg_scale=8"])
    items = recipe_items(ref, "dfine")
    wrong = {i for i in items if not same(items[i], our_value(cfg, i)) and deliberate("dfine_n_coco.yml", i) is None}
    assert wrong == {"optimizer.lr", "stop_epoch", "train_dataloader.dataset.transforms.policy.epoch",
                     "model.decoder.reg_scale"}
    # a reference setting the comparison does not know is reported, not skipped
    assert unread_keys({**ref, "new_setting": 1}) == ["new_setting"]


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yml")))
def test_print_config_works_for_every_config(config, capsys):
    """`tools/train.py -c CONFIG --print-config` (its main, in this process) prints the resolved config."""
    from dfine.cli.train import main
    from dfine.config import safe_load_yaml

    assert main(["-c", str(CONFIGS / config), "--print-config"]) == 0
    assert safe_load_yaml(capsys.readouterr().out) == dfine.load_config(CONFIGS / config)
