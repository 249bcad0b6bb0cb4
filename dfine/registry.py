"""Registries: a name -> class dict per kind of component, filled by explicit imports (see dfine/components.py).

A config section selects a class with ``type:``; every other key is a constructor argument::

    decoder:
      type: DFINETransformer
      num_layers: 6

``Registry.build`` checks the keys against the constructor's signature before calling it, so a typo
fails with the config path at fault and the closest valid names, not with a TypeError from deep inside.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable


class ConfigError(ValueError):
    """A config that cannot be used as written. The message names the file, key or path at fault."""


def did_you_mean(name: str, candidates, n: int = 3) -> str:
    """' (did you mean `a`, `b`?)' for the closest candidates, or '' when none is close."""
    close = difflib.get_close_matches(str(name), list(dict.fromkeys(str(c) for c in candidates)), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + ", ".join(f"`{c}`" for c in close) + "?)"


class Registry:
    """A named dict of component classes (or factory functions) with a registering decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, obj: Callable | None = None, *, name: str | None = None):
        """Use as ``@REG.register`` or ``@REG.register(name="Alias")``."""

        def add(target: Callable) -> Callable:
            key = name or target.__name__
            if key in self._entries and self._entries[key] is not target:
                raise KeyError(f"{self.kind} registry already has `{key}` ({self._entries[key]!r})")
            self._entries[key] = target
            return target

        return add(obj) if obj is not None else add

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, path: str = "") -> Callable:
        if name not in self._entries:
            where = f" at `{path}.type`" if path else ""
            known = ", ".join(sorted(self._entries)) or "none registered"
            raise ConfigError(
                f"unknown {self.kind} type `{name}`{where}{did_you_mean(name, self._entries)}; known: {known}"
            )
        return self._entries[name]

    def build(self, section: dict, path: str, **provided: Any):
        """Build the component described by ``section`` (a dict with ``type``) at config path ``path``.

        ``provided`` holds constructor arguments that the builder makes itself (sub-modules, for example);
        they must not also appear in the section.
        """
        if not isinstance(section, dict) or "type" not in section:
            raise ConfigError(f"`{path}` must be a mapping with a `type:` key naming a {self.kind}")
        target = self.get(section["type"], path)
        kwargs = {k: v for k, v in section.items() if k != "type"}
        for key in provided:
            if key in kwargs:
                raise ConfigError(f"`{path}.{key}` is built by the framework and cannot be set in the config")
        kwargs.update(provided)
        check_arguments(target, kwargs, path)
        return target(**kwargs)


def constructor_parameters(target: Callable) -> tuple[dict[str, inspect.Parameter], bool]:
    """(named parameters, accepts **kwargs) of a class's __init__ or a function."""
    fn = target.__init__ if inspect.isclass(target) else target
    params = dict(inspect.signature(fn).parameters)
    params.pop("self", None)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {k: p for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named, var_kw


def check_arguments(target: Callable, kwargs: dict, path: str) -> None:
    """Raise ConfigError naming `path.key` for unknown or missing constructor arguments."""
    named, var_kw = constructor_parameters(target)
    if not var_kw:
        for key in kwargs:
            if key not in named:
                raise ConfigError(
                    f"`{path}.{key}` is not an argument of {target.__name__}{did_you_mean(key, named)}; "
                    f"valid: {', '.join(named)}"
                )
    missing = [k for k, p in named.items() if p.default is p.empty and k not in kwargs]
    if missing:
        raise ConfigError(f"`{path}` ({target.__name__}) is missing required argument(s): {', '.join(missing)}")


BACKBONES = Registry("backbone")
ENCODERS = Registry("encoder")
DECODERS = Registry("decoder")
DETECTORS = Registry("detector")
MATCHERS = Registry("matcher")
CRITERIONS = Registry("criterion")
POSTPROCESSORS = Registry("postprocessor")
DATASETS = Registry("dataset")
TRANSFORMS = Registry("transform")
COLLATORS = Registry("collate function")
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("learning-rate scheduler")
EMAS = Registry("weight average")

ALL_REGISTRIES = (
    BACKBONES, ENCODERS, DECODERS, DETECTORS, MATCHERS, CRITERIONS, POSTPROCESSORS, DATASETS, TRANSFORMS, COLLATORS,
    OPTIMIZERS, SCHEDULERS, EMAS,
)


def find_component(name: str) -> Callable | None:
    """The class registered as ``name`` in any registry, or None."""
    for registry in ALL_REGISTRIES:
        if name in registry:
            return registry.get(name)
    return None
