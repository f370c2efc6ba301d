"""Benchmark evaluation with the training stack's own generation, scorers and chat template.

``config`` (the ``eval`` section), ``benchmarks`` (the registry of benchmark files and their
fields), ``metrics`` (avg@n, unbiased pass@k), ``runner`` (generate, score, summarise, write the
tables). Used by ``tools/eval.py`` offline and by the trainer between steps (docs/eval.md).
"""
