"""Fine-tuning across label sets: keep what a pretrained classifier already knows about the classes both share.

Every tensor with one row per class is a *class head*: the encoder's ``decoder.enc_score_head``, each decoder
layer's ``decoder.dec_score_head.{i}`` (weight [C, D] and bias [C]) and the denoising label embedding
``decoder.denoising_class_embed.weight`` ([C + 1, D]; the last row is the padding label). For the target's
label ``t`` whose class name equals (case-insensitively) the name of the source's label ``s``, row ``t`` of each
head is row ``s`` of the checkpoint; the other rows keep the model's own initialisation (new classes), and the
padding row is carried over. So before any training step the kept classes score exactly as in the source model.

Source class names: the checkpoint's ``classes.names`` (ours), else the released model's label set (COCO's 80
names; Objects365 models name the 80 COCO classes among their labels, through the reference's table).
"""

from __future__ import annotations

import logging
import re

import torch

from dfine.data.coco_categories import COCO_CLASS_NAMES

logger = logging.getLogger(__name__)

CLASS_MAP_MODES = ("auto", "none")
_CLASS_HEAD = re.compile(r"^decoder\.(?:enc_score_head|dec_score_head\.\d+)\.(?:weight|bias)$")
DENOISING_EMBED = "decoder.denoising_class_embed.weight"


def is_class_tensor(name: str) -> bool:
    """A tensor with one row per class (plus the padding row for the denoising embedding)."""
    return bool(_CLASS_HEAD.match(name)) or name == DENOISING_EMBED


def obj365_label_names() -> list[str]:
    """Names of the 366 labels of the Objects365 releases, as far as known: the 80 COCO classes at their
    Objects365 label (category id = index + 1, the reference's table); '' for the others."""
    from dfine.engine.checkpointing import OBJ365_INDEX_OF_COCO_CLASS

    names = [""] * 366
    for coco_label, obj_index in enumerate(OBJ365_INDEX_OF_COCO_CLASS):
        names[obj_index + 1] = COCO_CLASS_NAMES[coco_label]
    return names


def source_class_names(checkpoint: dict, state: dict, release_classes: str | None = None) -> list[str] | None:
    """Class name per label of the checkpoint's model, or None when unknown."""
    classes = checkpoint.get("classes") if isinstance(checkpoint, dict) else None
    if isinstance(classes, dict) and classes.get("names"):
        return [str(n) for n in classes["names"]]
    rows = state.get("decoder.enc_score_head.weight")
    count = rows.shape[0] if isinstance(rows, torch.Tensor) else None
    if release_classes == "coco" or (release_classes is None and count == len(COCO_CLASS_NAMES)):
        return list(COCO_CLASS_NAMES)
    if release_classes == "obj365" or (release_classes is None and count == 366):
        return obj365_label_names()
    return None


def is_obj365_to_coco(source_names: list[str], target_names: list[str]) -> bool:
    """The reference's own Objects365 -> COCO fine-tuning, which keeps the reference's head mapping."""
    coco = [n.lower() for n in COCO_CLASS_NAMES]
    return len(source_names) == 366 and [n.strip().lower() for n in target_names] == coco


def match_classes(source_names: list[str], target_names: list[str]) -> dict[int, int]:
    """{target label: source label} for the target classes whose name is a source class name (case-insensitive)."""
    index: dict[str, int] = {}
    for label, name in enumerate(source_names):
        key = name.strip().lower()
        if key:
            index.setdefault(key, label)
    return {t: index[n.strip().lower()] for t, n in enumerate(target_names) if n.strip().lower() in index}


def transfer_class_rows(state: dict, own: dict, matches: dict[int, int]) -> dict:
    """A copy of ``state`` whose class tensors have the model's shapes: matched rows from the checkpoint, the
    others from ``own`` (the model's initialisation). Class tensors whose other dimensions differ are left out
    (the loader then reports them)."""
    out = dict(state)
    for name, source in state.items():
        if not is_class_tensor(name) or name not in own or source.shape[1:] != own[name].shape[1:]:
            continue
        rows = own[name].detach().clone()
        for target_label, source_label in matches.items():
            if target_label < rows.shape[0] and source_label < source.shape[0]:
                rows[target_label] = source[source_label]
        if name == DENOISING_EMBED:
            rows[-1] = source[-1]  # the padding label
        out[name] = rows.to(source.dtype)
    return out


def class_table(source_names: list[str], target_names: list[str], matches: dict[int, int]) -> str:
    """The kept/new table logged at the start of fine-tuning."""
    lines = [f"{'label':>5}  {'class':<24} {'status':<6} checkpoint label"]
    for label, name in enumerate(target_names):
        if label in matches:
            lines.append(f"{label:>5}  {name:<24} {'kept':<6} {matches[label]} ({source_names[matches[label]]})")
        else:
            lines.append(f"{label:>5}  {name:<24} {'new':<6} -")
    lines.append(f"{len(matches)} kept, {len(target_names) - len(matches)} new, "
                 f"{len(source_names) - len(set(matches.values()))} checkpoint classes not used")
    return "\n".join(lines)
