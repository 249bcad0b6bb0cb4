"""Configs: safe YAML, ``__include__`` composition, deep merge, dotted overrides, references, validation.

A config file is YAML read with a safe loader (yaml.SafeLoader: no Python objects are ever constructed). It may list other files to build on::

    __include__: [base/runtime.yml, base/dfine_hgnetv2.yml]   # relative to this file
    epochs: 72

Included files are merged in order, then the including file on top (later wins; mappings merge key by key,
lists and scalars are replaced). Overrides ``a.b.c=value`` are applied last, with ``value`` read as YAML
(``3`` is an int, ``[1, 2]`` a list, ``null`` None).

Values used in several places (``num_classes``, ``eval_spatial_size``, ...) are declared once at the top level
and referenced as ``${num_classes}``; references are resolved after overrides, so ``-u num_classes=3``
reaches every place that refers to it.
"""

from __future__ import annotations

import copy
import os
import re
from collections import deque
from pathlib import Path
from typing import Any, Iterable

import yaml

from dfine.registry import ConfigError, constructor_parameters, did_you_mean, find_component
from dfine.settings import check_settings
from dfine.utils.files import atomic_write

INCLUDE_KEY = "__include__"

# Every key allowed at the top of a resolved config, with what it means. A key not listed here is a typo
# (or belongs in a section); adding a new top-level setting means adding it here, documented.
TOP_LEVEL_KEYS: dict[str, str] = {
    "data": "a dataset folder (COCO, Roboflow COCO export) or YOLO data.yaml: fills the dataset paths and num_classes",
    "num_classes": "number of object classes the model predicts",
    "eval_spatial_size": "[H, W] the model is built for at evaluation (anchors and position embeddings are cached for it)",
    "remap_mscoco_category": "map contiguous labels back to COCO's 91 category ids in predictions",
    "model": "the detector: backbone, encoder, decoder",
    "criterion": "the training loss and its matcher",
    "postprocessor": "turns raw outputs into detections",
    "train_dataloader": "training data: dataset, transforms, batching",
    "val_dataloader": "validation data",
    "optimizer": "optimizer type, learning rates and parameter groups",
    "lr_scheduler": "learning-rate schedule over the main phase",
    "lr_warmup_scheduler": "linear learning-rate warm-up",
    "ema": "exponential moving average of the weights",
    "use_ema": "keep and evaluate an EMA copy of the model",
    "epochs": "total number of training epochs",
    "stop_epoch": "epoch from which strong augmentation and multi-scale stop (the no-augmentation phase)",
    "reload_best_at_stop_epoch": "at stop_epoch continue from best.pth (weights, EMA, optimizer), as D-FINE does",
    "clip_max_norm": "gradient clipping max norm (0 disables)",
    "use_amp": "mixed precision training",
    "amp_dtype": "`bfloat16` or `float16` (float16 uses a GradScaler)",
    "compile": "torch.compile the training forward and the evaluated model (first steps compile; see README)",
    "gradient_accumulation_steps": "optimizer step every N batches",
    "sync_bn": "convert BatchNorm to SyncBatchNorm under DDP",
    "find_unused_parameters": "DDP find_unused_parameters (off: every parameter gets a gradient)",
    "max_bad_steps": "stop after this many consecutive non-finite losses",
    "early_stopping": "{patience, min_delta, metric, even_in_main_phase}: stop when the EMA model's metric plateaus (null: off)",
    "time_limit": "hours: stop cleanly after the last epoch that fits (null: no limit)",
    "skip_bad_samples": "skip (log and count) images that became unreadable during the run instead of stopping",
    "dist_timeout_minutes": "a collective that takes longer fails, naming rank and step, instead of hanging",
    "output_dir": "where checkpoints, logs and the resolved config go",
    "summary_dir": "TensorBoard folder (default: output_dir/summary)",
    "loggers": "experiment loggers, any of [tensorboard, wandb, mlflow] (rank 0 only)",
    "checkpoint_freq": "write checkpointNNNN.pth every N epochs",
    "checkpoint_every_steps": "also write last.pth every N optimizer steps, resumable mid-epoch (0: off)",
    "print_freq": "log every N steps",
    "seed": "random seed",
    "device": "`cpu`, `cuda`, `cuda:1`, ... (default: cuda when available)",
    "tuning": "checkpoint to fine-tune from",
    "tuning_class_map": "`auto`: keep the class-head rows of classes whose names match the checkpoint's; `none`: all new",
}

_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


class _SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no object construction) that also reads ``1e-4`` as a float, as YAML 1.2 does;
    plain YAML 1.1 would make it the string '1e-4' and a learning rate would fail far from the config."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def safe_load_yaml(text_or_stream):
    """Parse YAML safely (see _SafeLoader)."""
    loader = _SafeLoader(text_or_stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict:
    """Read, compose, override, resolve and validate a config.

    Args:
        path: a YAML file.
        overrides: ``"a.b.c=value"`` strings, applied after all includes.
    Returns:
        A plain dict; a fresh one on every call (nothing is shared between two loads).
    Raises:
        ConfigError naming the file, include chain, key or override at fault.
    """
    source = compose_config(path, overrides)
    cfg = finish_config(source)
    _RECENT_SOURCES.append(source)
    return cfg


def compose_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict:
    """The config before resolution: includes merged, overrides and the ``data`` key applied, ``${...}``
    references kept. ``finish_config`` of it is what ``load_config`` returns."""
    cfg = _read_with_includes(Path(path), chain=())
    overrides = list(overrides)
    _apply_overrides(cfg, overrides)
    if cfg.get("data"):
        from dfine.data.layouts import apply_data_key

        written = "num_classes" in _read_yaml(Path(path), ()) or any(
            item.split("=", 1)[0].strip() == "num_classes" for item in overrides)
        apply_data_key(cfg, num_classes_set=written)
    return cfg


def finish_config(cfg: dict) -> dict:
    """Resolve the references of a composed config and validate the result; returns a new dict."""
    resolved = resolve_references(cfg)
    validate_config(resolved)
    return resolved


def config_from_checkpoint(checkpoint: dict | None, overrides: Iterable[str] = (), source: str = "the checkpoint") -> dict:
    """The resolved config stored in one of our checkpoints, with ``overrides`` applied before references are
    resolved, so ``-u eval_spatial_size=[320,320]`` reaches every place that uses it.

    Checkpoints store the config with its references (``stored_config``). Older ones (and conversions) store it
    resolved: the known uses of the top-level keys are linked again first (``link_references``).
    ``data=PATH`` among the overrides fills the dataset paths from that folder, whose classes must match the
    model's ``num_classes``.

    Raises:
        ConfigError when the checkpoint stores no config (a reference release) or an override does not fit.
    """
    stored = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(stored, dict):
        raise ConfigError(f"{source} stores no config (a reference release?); pass the matching one with -c")
    cfg = copy.deepcopy(stored) if _has_references(stored) else link_references(stored)
    overrides = list(overrides)
    _apply_overrides(cfg, overrides)
    if any(item.split("=", 1)[0].strip() == "data" for item in overrides):
        from dfine.data.layouts import apply_data_key

        apply_data_key(cfg, num_classes_set=True)  # a trained model on another dataset: the classes must agree
    return finish_config(cfg)


def _apply_overrides(cfg: dict, overrides: list[str]) -> None:
    if overrides:
        # An override may set a constructor argument the file leaves at its default; the registries must be
        # filled to know those arguments. Imported here: the components themselves import this module.
        from dfine.components import import_components

        import_components()
    for item in overrides:
        apply_override(cfg, item)


# -- the config a checkpoint stores -------------------------------------------------------------------------------
# Top-level keys whose uses deeper in the config are references to them, in every shipped config.
LINKED_KEYS = ("num_classes", "eval_spatial_size", "remap_mscoco_category", "stop_epoch")

# The configs load_config composed last, so that the trainer can store the one behind a resolved config it is
# given (a few: a process loads one config for a run; tests load several).
_RECENT_SOURCES: deque[dict] = deque(maxlen=8)


def stored_config(cfg: dict) -> dict:
    """What a checkpoint stores for the resolved ``cfg``: the config ``load_config`` composed it from, with its
    references, when ``cfg`` is still exactly what that resolves to; otherwise (``cfg`` built or changed in code)
    ``link_references(cfg)``. Either way an override on the stored config reaches every use of the key."""
    for source in reversed(_RECENT_SOURCES):
        if resolve_references(source) == cfg:
            return copy.deepcopy(source)
    return link_references(cfg)


def link_references(cfg: dict) -> dict:
    """A copy of a resolved ``cfg`` with the known uses of the ``LINKED_KEYS`` made references again:

    - a key named like a linked top-level key (``model.decoder.num_classes``, ``model.encoder.eval_spatial_size``,
      ``postprocessor.remap_mscoco_category``, ``train_dataloader.collate_fn.stop_epoch``, ...) holding the same
      value becomes ``${key}``;
    - the ``size`` of a ``Resize`` op equal to ``eval_spatial_size`` becomes ``${eval_spatial_size}``;
    - the ``epoch`` of a ``stop_epoch`` augmentation policy equal to ``stop_epoch`` becomes ``${stop_epoch}``.

    Other references of the original files (DEIM's per-op epoch lists) cannot be told from equal values and
    stay values.
    """
    top = {key: cfg[key] for key in LINKED_KEYS if cfg.get(key) is not None}

    def link(node):
        if isinstance(node, list):
            return [link(item) for item in node]
        if not isinstance(node, dict):
            return copy.deepcopy(node)
        out = {}
        for key, value in node.items():
            if key in top and type(value) is type(top[key]) and value == top[key]:
                out[key] = f"${{{key}}}"
            else:
                out[key] = link(value)
        if node.get("type") == "Resize" and "eval_spatial_size" in top and node.get("size") == top["eval_spatial_size"]:
            out["size"] = "${eval_spatial_size}"
        if node.get("name") == "stop_epoch" and "stop_epoch" in top and node.get("epoch") == top["stop_epoch"]:
            out["epoch"] = "${stop_epoch}"
        return out

    return {key: value if key in top else link(value) for key, value in cfg.items()}


def _has_references(node) -> bool:
    if isinstance(node, dict):
        return any(_has_references(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_references(v) for v in node)
    return isinstance(node, str) and _REFERENCE.search(node) is not None


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict:
    where = " -> ".join(str(p) for p in (*chain, path))
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (include chain: {where})")
    try:
        with open(path, encoding="utf-8") as f:
            data = safe_load_yaml(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse YAML in {path}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at its top level, not a {type(data).__name__}")
    return data


def _read_with_includes(path: Path, chain: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"include cycle: {cycle}")
    data = _read_yaml(path, chain)
    includes = data.pop(INCLUDE_KEY, [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: `{INCLUDE_KEY}` must be a list of file paths")
    merged: dict = {}
    for include in includes:
        merged = deep_merge(merged, _read_with_includes(path.parent / include, (*chain, path)))
    return deep_merge(merged, data)


def deep_merge(base: dict, update: dict) -> dict:
    """A new dict: ``update`` on top of ``base``; nested mappings merge, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _allowed_keys(node: dict) -> list[str]:
    """Keys a mapping may gain through an override: its own, plus constructor arguments of its `type`."""
    keys = list(node)
    component = find_component(node["type"]) if isinstance(node.get("type"), str) else None
    if component is not None:
        named, _ = constructor_parameters(component)
        keys += [k for k in named if k not in node]
    return keys


def apply_override(cfg: dict, item: str) -> None:
    """Apply one ``a.b.c=value`` override in place. The path must name an existing key, a constructor
    argument of the component at that place, or a documented top-level key."""
    if "=" not in item:
        raise ConfigError(f"override `{item}` must look like key.path=value")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    try:
        value = safe_load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override `{item}`: value is not valid YAML ({err})") from None

    node: Any = cfg
    for depth, key in enumerate(keys):
        here = ".".join(keys[: depth + 1])
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
                raise ConfigError(f"override `{dotted}`: `{here}` indexes a list of {len(node)} items")
            key = int(key)
        elif isinstance(node, dict):
            allowed = _allowed_keys(node) + (list(TOP_LEVEL_KEYS) if depth == 0 else [])
            if key not in allowed:
                raise ConfigError(
                    f"override `{dotted}`: `{here}` matches no known key{did_you_mean(key, allowed)}"
                )
        else:
            raise ConfigError(f"override `{dotted}`: `{'.'.join(keys[:depth])}` is a value, not a section")
        if last:
            node[key] = value
        else:
            child = node[key] if (isinstance(node, list) or key in node) else None
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, (dict, list)):
                raise ConfigError(f"override `{dotted}`: `{here}` is a value, not a section")
            node = child


def _lookup(cfg: dict, dotted: str):
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(dotted)
        node = node[key]
    return node


def resolve_references(cfg: dict) -> dict:
    """Replace ``${key}`` / ``${a.b}`` with the referenced value. A string that is exactly one reference takes
    the value with its type; references inside longer strings are formatted in."""

    def resolve(value, path: str, seen: tuple[str, ...]):
        if isinstance(value, dict):
            return {k: resolve(v, f"{path}.{k}" if path else str(k), seen) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, f"{path}.{i}", seen) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value

        def target(name: str):
            if name in seen:
                raise ConfigError(f"`{path}`: reference cycle through ${{{name}}}")
            try:
                found = _lookup(cfg, name)
            except KeyError:
                raise ConfigError(
                    f"`{path}` refers to ${{{name}}}, which is not defined{did_you_mean(name, TOP_LEVEL_KEYS)}"
                ) from None
            return resolve(found, name, (*seen, name))

        whole = _REFERENCE.fullmatch(value)
        if whole:
            return copy.deepcopy(target(whole.group(1)))
        return _REFERENCE.sub(lambda m: str(target(m.group(1))), value)

    return resolve(cfg, "", ())


def validate_config(cfg: dict) -> None:
    """Reject unknown top-level keys, unknown component types, keys that are no constructor argument, and values
    outside their declared type and range (dfine/settings.py)."""
    from dfine.components import import_components

    import_components()
    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"unknown top-level config key `{key}`{did_you_mean(key, TOP_LEVEL_KEYS)}")
    _validate_node(cfg, "")
    check_settings(cfg)


def _validate_node(node, path: str) -> None:
    if isinstance(node, list):
        for i, item in enumerate(node):
            _validate_node(item, f"{path}.{i}")
        return
    if not isinstance(node, dict):
        return
    type_name = node.get("type")
    if isinstance(type_name, str):
        component = find_component(type_name)
        if component is None:
            from dfine.registry import ALL_REGISTRIES

            known = [name for registry in ALL_REGISTRIES for name in registry]
            raise ConfigError(f"unknown type `{type_name}` at `{path}.type`{did_you_mean(type_name, known)}")
        named, var_kw = constructor_parameters(component)
        if not var_kw:
            for key in node:
                if key != "type" and key not in named:
                    raise ConfigError(
                        f"`{path}.{key}` is not an argument of {type_name}{did_you_mean(key, named)}"
                    )
    for key, value in node.items():
        _validate_node(value, f"{path}.{key}" if path else str(key))


def dump_config(cfg: dict, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (for the output folder at train start); returns the path."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        f.write(config_to_yaml(cfg).encode("utf-8"))
    return path


def config_to_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=120)
