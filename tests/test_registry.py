"""Registry: registration, lookup errors with suggestions, argument checking, and the public API names."""

from __future__ import annotations

import pytest

import dfine
from dfine.registry import ALL_REGISTRIES, ConfigError, Registry, find_component


def make_registry():
    reg = Registry("widget")

    @reg.register
    class Widget:
        def __init__(self, width: int, depth: int = 2):
            self.width, self.depth = width, depth

    @reg.register(name="Gadget")
    def make_gadget(size: int = 1, **extra):
        return ("gadget", size, extra)

    return reg, Widget


def test_register_and_build():
    reg, widget_cls = make_registry()
    assert "Widget" in reg and "Gadget" in reg and len(reg) == 2
    obj = reg.build({"type": "Widget", "width": 3}, "model.widget")
    assert isinstance(obj, widget_cls) and (obj.width, obj.depth) == (3, 2)
    assert reg.build({"type": "Gadget", "size": 4, "colour": "red"}, "g") == ("gadget", 4, {"colour": "red"})


def test_provided_arguments_are_passed_and_cannot_be_configured():
    reg, _ = make_registry()
    assert reg.build({"type": "Widget"}, "w", width=5).width == 5
    with pytest.raises(ConfigError, match=r"`w.width` is built by the framework"):
        reg.build({"type": "Widget", "width": 1}, "w", width=5)


def test_unknown_type_lists_close_names():
    reg, _ = make_registry()
    with pytest.raises(ConfigError, match=r"unknown widget type `Widgt` at `model.widget.type` \(did you mean `Widget`\?\)"):
        reg.build({"type": "Widgt", "width": 1}, "model.widget")


def test_unknown_argument_names_path_and_suggestion():
    reg, _ = make_registry()
    with pytest.raises(ConfigError, match=r"`model.widget.widht` is not an argument of Widget \(did you mean `width`\?\)"):
        reg.build({"type": "Widget", "widht": 1}, "model.widget")


def test_missing_argument_names_path():
    reg, _ = make_registry()
    with pytest.raises(ConfigError, match=r"`model.widget` \(Widget\) is missing required argument\(s\): width"):
        reg.build({"type": "Widget"}, "model.widget")


def test_section_must_have_type():
    reg, _ = make_registry()
    with pytest.raises(ConfigError, match="must be a mapping with a `type:` key"):
        reg.build({"width": 1}, "model.widget")


def test_duplicate_registration_is_refused():
    reg, _ = make_registry()
    with pytest.raises(KeyError, match="already has `Widget`"):

        @reg.register(name="Widget")
        class Other:
            pass


def test_registries_have_unique_names_across_kinds():
    seen = {}
    dfine.components.import_components()
    for registry in ALL_REGISTRIES:
        for name in registry:
            assert name not in seen, f"`{name}` is registered as {seen.get(name)} and {registry.kind}"
            seen[name] = registry.kind
            assert find_component(name) is not None


def test_public_api_names():
    for name in ("load_config", "build_model", "build_criterion", "build_postprocessor", "build_dataloader",
                 "load_checkpoint"):
        assert callable(getattr(dfine, name)), name
