"""Adapters on disk: PEFT's LoRA / DoRA and VeRA / DVoRA files, atomic writes, safe reads.

Imports only ``dorakit.adapters``; ``dispatch`` picks the format for ``save_adapter`` / ``load_adapter``.
"""
