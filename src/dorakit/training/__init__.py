"""Training: the one loop, data, checkpoints, CUDA graphs, several processes, evaluation, recipes.

Imports ``dorakit.adapters``, ``dorakit.formats`` and ``dorakit.analysis``, never ``dorakit.commands``.
"""
