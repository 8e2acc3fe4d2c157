"""Benchmarks for recbole-ssm: ``python -m benchmarks.quality`` (ranking quality through RecBole's
trainer) and ``python -m benchmarks.efficiency`` (latency, training step time and memory against
sequence length). What both share lives in :mod:`benchmarks.common`; see ``benchmarks/README.md``.
"""
