"""Interoperability with other model formats. Nothing here is imported by the core library; each module
imports its optional dependency (e.g. ``transformers``) lazily, inside the functions that need it.

    hf_config.py  model settings <-> transformers' DFineConfig / RTDetrV2Config (no import of hf.py)
    hf.py         weights and folders <-> Hugging Face (uses hf_config.py)
"""
