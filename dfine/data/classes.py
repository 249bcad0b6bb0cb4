"""What a label means: the one object that knows class names and the label -> category id map.

The model predicts contiguous labels 0..C-1; ground truth, COCO result files and people use category ids and
names. A ``LabelMap`` is built from whatever describes the classes at hand and answers every question about them:

* ``LabelMap.from_dataset(dataset)``: a training / validation dataset (``class_names``, ``label_to_category``);
* ``LabelMap.from_checkpoint(checkpoint["classes"], cfg)``: the ``"classes"`` entry our checkpoints store,
  ``{"names": [...], "label_to_category": {label: id}, "remap_mscoco_category": bool}`` (``to_checkpoint``);
* ``LabelMap.from_metadata(...)``: the JSON an exported ONNX file carries, ``{"names": [...],
  "label_to_category": {"0": id, ...}}`` (``to_metadata``);
* ``LabelMap.coco()``: COCO's 80 classes and their sparse ids 1..90 (``remap_mscoco_category``).

Labels are mapped to category ids in one step of each pipeline: by the postprocessor when
``remap_mscoco_category`` is on (it holds ``LabelMap.coco().lookup_table()``), else by the consumer of the
postprocessor's labels (the evaluation loop, inference records, the AP check) through ``category_id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dfine.data.coco_categories import COCO_CLASS_NAMES, MSCOCO_LABEL_TO_CATEGORY


def _int_map(mapping) -> dict[int, int]:
    """{label: category id} with int keys and values (JSON and some writers give string keys)."""
    return {int(k): int(v) for k, v in (mapping or {}).items()}


@dataclass
class LabelMap:
    """``names[label]`` is the class name (may be empty or missing: ``name`` then gives the label itself);
    ``label_to_category[label]`` the category id written into COCO records (a label without an entry is its own
    id); ``remap_mscoco_category``: the COCO table is in use and the postprocessor applies it itself."""

    names: list[str] = field(default_factory=list)
    label_to_category: dict[int, int] = field(default_factory=dict)
    remap_mscoco_category: bool = False

    @classmethod
    def coco(cls) -> "LabelMap":
        return cls(list(COCO_CLASS_NAMES), dict(MSCOCO_LABEL_TO_CATEGORY), True)

    @classmethod
    def from_dataset(cls, dataset, remap_mscoco_category: bool = False) -> "LabelMap":
        """From a dataset's ``class_names`` and ``label_to_category`` (either may be absent)."""
        return cls(
            names=list(getattr(dataset, "class_names", []) or []),
            label_to_category=_int_map(getattr(dataset, "label_to_category", None)),
            remap_mscoco_category=bool(remap_mscoco_category),
        )

    @classmethod
    def from_checkpoint(cls, classes, cfg: dict | None = None) -> "LabelMap":
        """From a checkpoint's ``"classes"`` entry (None or malformed: nothing known). A COCO-remapped model (the
        entry or ``cfg`` says ``remap_mscoco_category``) maps through COCO's table and, lacking names, COCO's."""
        stored = classes if isinstance(classes, dict) else {}
        names = list(stored.get("names") or [])
        mapping = _int_map(stored.get("label_to_category"))
        remap = bool((cfg or {}).get("remap_mscoco_category") or stored.get("remap_mscoco_category"))
        if remap:
            names = names or list(COCO_CLASS_NAMES)
            mapping = dict(MSCOCO_LABEL_TO_CATEGORY)
        return cls(names, mapping, remap)

    @classmethod
    def from_metadata(cls, stored: dict | None) -> "LabelMap":
        """From the class description stored in an exported ONNX file (None: nothing known)."""
        stored = stored or {}
        return cls(list(stored.get("names") or []), _int_map(stored.get("label_to_category")))

    @property
    def category_ids(self) -> dict[int, int]:
        """``label_to_category`` under the name the deploy API has used since its start."""
        return self.label_to_category

    def name(self, label: int) -> str:
        label = int(label)
        if 0 <= label < len(self.names) and self.names[label]:
            return self.names[label]
        return str(label)

    def category_id(self, label: int) -> int:
        return int(self.label_to_category.get(int(label), int(label)))

    def label_of_category(self, category_id: int) -> int:
        """The label whose category id is ``category_id`` (itself when none has it)."""
        for label, category in self.label_to_category.items():
            if category == int(category_id):
                return label
        return int(category_id)

    def map_labels(self, labels: Tensor) -> Tensor:
        """[K] labels -> [K] category ids (int64, on the CPU)."""
        return torch.tensor([self.category_id(label) for label in labels.tolist()], dtype=torch.long)

    def lookup_table(self) -> Tensor:
        """[C] int64 with the category id of each label 0..C-1 (C = the largest mapped label + 1), for mapping
        a whole tensor of labels by indexing on its own device."""
        size = max(self.label_to_category, default=-1) + 1
        return torch.tensor([self.category_id(label) for label in range(size)], dtype=torch.long)

    def to_checkpoint(self) -> dict:
        """The checkpoint's ``"classes"`` entry (layout fixed: released checkpoints and tests read it)."""
        return {"names": list(self.names), "label_to_category": dict(self.label_to_category),
                "remap_mscoco_category": self.remap_mscoco_category}

    def to_metadata(self) -> dict:
        """The ONNX file's class description (JSON keys are strings)."""
        return {"names": list(self.names), "label_to_category": {str(k): int(v) for k, v in self.label_to_category.items()}}
