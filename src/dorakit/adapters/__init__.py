"""The math and the modules: pure functions, config, adapter layers, kernels, injection, counting.

The bottom layer of dorakit: it imports nothing else of the package.
"""
