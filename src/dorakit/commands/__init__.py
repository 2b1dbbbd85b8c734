"""The ``dorakit`` command line and its subcommands (finetune, eval, merge, analyze, sweep, params, demo).

The top layer: it may import any other part of dorakit.
"""
