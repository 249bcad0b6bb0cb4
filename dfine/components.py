"""Fills the registries by importing every module that registers a component, explicitly and in one place."""

from __future__ import annotations

import importlib

# Each package's __init__ imports its own registering modules by name.
COMPONENT_PACKAGES = ("dfine.models", "dfine.losses", "dfine.data", "dfine.engine")


def import_components() -> None:
    for package in COMPONENT_PACKAGES:
        importlib.import_module(package)
