"""Registering modules are imported here explicitly."""
