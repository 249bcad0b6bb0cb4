"""Backbones. Registering modules are imported explicitly by dfine/models/__init__.py."""
