"""Evaluation: feature extractors, streaming statistics, FID and friends, seed-sharded generation.

Import submodules explicitly (``from eval import fid``); never ``import eval``, which shadows the builtin.
"""
