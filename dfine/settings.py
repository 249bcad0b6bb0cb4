"""The declared type and range of every run setting, in one table, and the check that applies it to a loaded config.

``RUNTIME_SETTINGS`` covers every documented top-level key (``dfine.config.TOP_LEVEL_KEYS``; a test keeps the two
in step); ``SECTION_SETTINGS`` adds ranges inside sections that constructor annotations cannot express (a learning
rate is a float there, but only a positive one makes sense). Component arguments are checked against their
constructor's annotations (``int``, ``float``, ``bool``, ``str``, ``Sequence[int]``, ``X | None``, ...).

``check_settings`` runs once the config is fully resolved (after overrides and ``${...}`` references), so
``-u epochs=many`` fails at load time, before anything is built, with::

    epochs: expected an integer >= 1, got 'many'
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from dfine.registry import ConfigError, find_component


@dataclass(frozen=True)
class Setting:
    """One setting's type and range. ``kind``: int, float, bool, str, choice, size, section, list, device."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # a strict lower bound (> low instead of >= low)
    choices: tuple = ()
    nullable: bool = False
    multiple: int = 1  # size: each entry a multiple of this

    def accepts(self, value) -> bool:
        if value is None:
            return self.nullable
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "int":
            return _is_int(value) and self._in_range(value)
        if self.kind == "float":
            return _is_number(value) and math.isfinite(value) and self._in_range(value)
        if self.kind == "str":
            return isinstance(value, str) and value != ""
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if self.kind == "section":
            return isinstance(value, dict)
        if self.kind == "list":
            return isinstance(value, (list, tuple))
        if self.kind == "size":
            return (isinstance(value, (list, tuple)) and len(value) == 2
                    and all(_is_int(v) and v > 0 and v % self.multiple == 0 for v in value))
        if self.kind == "device":
            return isinstance(value, str) and _parses_as_device(value)
        raise AssertionError(f"unknown setting kind {self.kind!r}")

    def _in_range(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        text = {
            "bool": "true or false",
            "int": "an integer",
            "float": "a number",
            "str": "a non-empty string (a path)",
            "choice": "one of " + ", ".join(map(str, self.choices)),
            "section": "a mapping (a config section)",
            "list": "a list",
            "size": "[H, W], two positive integers" + (f" that are multiples of {self.multiple}" if self.multiple > 1 else ""),
            "device": "a device name such as cpu, cuda, cuda:1 or mps",
        }[self.kind]
        if self.kind in ("int", "float"):
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
            if self.high is not None:
                bounds.append(f"<= {_number(self.high)}")
            if bounds:
                text += " " + " and ".join(bounds)
        if self.nullable:
            text += " (or null)"
        return text


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parses_as_device(name: str) -> bool:
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


# ---- constructors that keep the table readable


def integer(low: int | None = None, high: int | None = None, nullable: bool = False) -> Setting:
    return Setting("int", low, high, nullable=nullable)


def number(low: float | None = None, high: float | None = None, above: float | None = None, nullable: bool = False) -> Setting:
    """``low`` <= x (or ``above`` < x) and x <= ``high``."""
    if above is not None:
        return Setting("float", above, high, low_open=True, nullable=nullable)
    return Setting("float", low, high, nullable=nullable)


def boolean() -> Setting:
    return Setting("bool")


def choice(*options: str, nullable: bool = False) -> Setting:
    return Setting("choice", choices=options, nullable=nullable)


def path(nullable: bool = True) -> Setting:
    return Setting("str", nullable=nullable)


def section(nullable: bool = False) -> Setting:
    return Setting("section", nullable=nullable)


def listing(nullable: bool = True) -> Setting:
    return Setting("list", nullable=nullable)


# Feature maps go down to stride 32: anchors and position embeddings are cached for eval_spatial_size / 32.
MODEL_STRIDE = 32

AMP_DTYPES = ("bfloat16", "float16", "bf16", "fp16")

RUNTIME_SETTINGS: dict[str, Setting] = {
    "num_classes": integer(1),
    "eval_spatial_size": Setting("size", multiple=MODEL_STRIDE),
    "remap_mscoco_category": boolean(),
    "model": section(),
    "criterion": section(),
    "postprocessor": section(),
    "train_dataloader": section(),
    "val_dataloader": section(),
    "optimizer": section(),
    "lr_scheduler": section(nullable=True),
    "lr_warmup_scheduler": section(nullable=True),
    "ema": section(nullable=True),
    "use_ema": boolean(),
    "epochs": integer(1),
    "stop_epoch": integer(0, nullable=True),
    "reload_best_at_stop_epoch": boolean(),
    "clip_max_norm": number(0, nullable=True),
    "use_amp": boolean(),
    "amp_dtype": choice(*AMP_DTYPES, nullable=True),
    "compile": boolean(),
    "gradient_accumulation_steps": integer(1, nullable=True),
    "sync_bn": boolean(),
    "find_unused_parameters": boolean(),
    "max_bad_steps": integer(1, nullable=True),
    "early_stopping": section(nullable=True),  # its entries: dfine/engine/early_stopping.py
    "time_limit": number(above=0, nullable=True),
    "skip_bad_samples": boolean(),
    "dist_timeout_minutes": number(above=0, nullable=True),
    "loggers": listing(),  # its entries: dfine/engine/loggers.py
    "checkpoint_every_steps": integer(0, nullable=True),
    "output_dir": path(),
    "summary_dir": path(),
    "checkpoint_freq": integer(0, nullable=True),
    "print_freq": integer(1, nullable=True),
    "seed": integer(0, nullable=True),
    "device": Setting("device", nullable=True),
    "tuning": path(),
    "tuning_class_map": choice("auto", "none"),
    "data": path(),
}
"""Every top-level key -> its type and range. A key in TOP_LEVEL_KEYS must have an entry (tests/test_settings.py)."""

# Inside sections: dotted paths, ``*`` standing for any list index or mapping key.
SECTION_SETTINGS: dict[str, Setting] = {
    "optimizer.lr": number(above=0),
    "optimizer.weight_decay": number(0),
    "optimizer.params.*.lr": number(above=0),
    "optimizer.params.*.weight_decay": number(0),
    "ema.decay": number(0, 1),
    "ema.restart_decay": number(0, 1, nullable=True),
    "lr_warmup_scheduler.warmup_duration": integer(0),
    **{
        f"{loader}.{key}": setting
        for loader in ("train_dataloader", "val_dataloader")
        for key, setting in {
            "total_batch_size": integer(1),
            "batch_size": integer(1),
            "num_workers": integer(0),
            "prefetch_factor": integer(1),
            "shuffle": boolean(),
            "drop_last": boolean(),
            "pin_memory": boolean(),
            "persistent_workers": boolean(),
        }.items()
    },
}


def check_settings(cfg: dict) -> None:
    """Raise ConfigError ``<dotted key>: expected <type/range>, got <value>`` for the first value that does not fit
    its declared setting or its constructor's annotation."""
    for key, setting in RUNTIME_SETTINGS.items():
        if key in cfg:
            _check(key, cfg[key], setting)
    # stop_epoch <= epochs is left to the training schedule (dfine/engine/phases.py): `--print-config -u epochs=3`
    # on a 160-epoch config must still print, so the user can see what else to change.
    for pattern, setting in SECTION_SETTINGS.items():
        for where, value in _matches(cfg, pattern.split(".")):
            _check(where, value, setting)
    for where, node in _component_sections(cfg, ""):
        check_component_arguments(node, where)


def check_runtime_setting(cfg: dict, key: str) -> None:
    """ConfigError when ``cfg[key]`` does not fit its entry in RUNTIME_SETTINGS (for callers handed a config that
    may not have come through ``load_config``)."""
    if key in cfg:
        _check(key, cfg[key], RUNTIME_SETTINGS[key])


def _check(where: str, value, setting: Setting) -> None:
    if not setting.accepts(value):
        raise ConfigError(f"{where}: expected {setting.describe()}, got {shown(value)}")


def shown(value) -> str:
    """A value as the user wrote it in YAML: true, null, 'many', [640]."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def _matches(node, keys: list[str], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every value under ``node`` at ``keys`` (``*``: any key or index)."""
    if not keys:
        yield prefix, node
        return
    head, rest = keys[0], keys[1:]
    if isinstance(node, dict):
        items = node.items() if head == "*" else ([(head, node[head])] if head in node else [])
    elif isinstance(node, list) and head == "*":
        items = enumerate(node)
    else:
        return
    for key, child in items:
        yield from _matches(child, rest, f"{prefix}.{key}" if prefix else str(key))


def _component_sections(node, path: str) -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            yield path, node
        for key, child in node.items():
            yield from _component_sections(child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _component_sections(child, f"{path}.{i}")


# ---- component arguments against constructor annotations


def check_component_arguments(node: dict, path: str) -> None:
    """Each key of a ``type:`` section against the annotation of the constructor argument it sets. Arguments
    without an (importable) annotation are not checked; a nested ``type:`` section is checked as its own component."""
    component = find_component(node["type"])
    if component is None:
        return  # validate_config reports unknown types
    hints = constructor_hints(component)
    defaults = _defaults(component)
    for key, value in node.items():
        if key == "type" or key not in hints:
            continue
        if isinstance(value, dict) and "type" in value:
            continue
        if value is None and defaults.get(key, inspect.Parameter.empty) is None:
            continue  # `x: int = None`: None is the documented "not set"
        hint = hints[key]
        if not matches(value, hint):
            raise ConfigError(
                f"{path}.{key}: expected {describe(hint)} ({_name(component)} argument), got {shown(value)}"
            )


def _name(component: Callable) -> str:
    return getattr(component, "__name__", str(component))


def _defaults(component: Callable) -> dict:
    fn = component.__init__ if inspect.isclass(component) else component
    try:
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}
    except (TypeError, ValueError):
        return {}


def constructor_hints(component: Callable) -> dict[str, Any]:
    """Resolved annotations of a constructor's arguments; an annotation that cannot be resolved is left out."""
    fn = component.__init__ if inspect.isclass(component) else component
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - a forward reference the module only imports for type checkers
        hints = {}
        namespace = {**vars(collections.abc), **vars(typing)}
        for name, param in inspect.signature(fn).parameters.items():
            annotation = param.annotation
            if isinstance(annotation, str):
                try:
                    annotation = eval(annotation, getattr(fn, "__globals__", {}), namespace)  # noqa: S307 - annotation text from our own imports
                except Exception:  # noqa: BLE001 - unresolvable: leave the argument unchecked
                    continue
            if annotation is not inspect.Parameter.empty:
                hints[name] = annotation
    hints.pop("return", None)
    return hints


_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection,
              collections.abc.MutableSequence)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def matches(value, hint) -> bool:
    """Whether a YAML value (None, bool, int, float, str, list, dict) fits a type annotation. An int fits ``float``;
    a bool fits only ``bool``; a string is no sequence; a class YAML cannot produce (a Tensor, a Module) fits nothing."""
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (origin is not None and _is_union_type(origin)):
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in _MAPPINGS:
        return isinstance(value, dict)
    if container in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        return all(matches(v, item) for v in value)
    return False


def _is_union_type(origin) -> bool:
    import types

    return origin is getattr(types, "UnionType", None)


def describe(hint) -> str:
    """``float | None`` -> 'float or null', ``Sequence[int]`` -> 'a list of int'."""
    if hint is Any:
        return "anything"
    if hint is None or hint is type(None):
        return "null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (origin is not None and _is_union_type(origin)):
        return " or ".join(describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    container = origin or hint
    if container in _MAPPINGS:
        return "a mapping"
    if container in _SEQUENCES:
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
        return f"a list of {describe(args[0])}" if args else "a list"
    return getattr(hint, "__name__", str(hint))
