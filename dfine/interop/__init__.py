"""Interoperability with other model formats. Nothing here is imported by the core library; each module
imports its optional dependency (e.g. ``transformers``) lazily, inside the functions that need it."""
