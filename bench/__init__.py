"""Benchmarks and explanation-quality measurements, written to ``BENCHMARKS.md``.

``python -m bench`` runs every comparison, each in its own process and each against its
reference in the same run, on the machine at hand; ``--quick`` runs them tiny, as a smoke test.
See :mod:`bench.__main__` for the command line and :mod:`bench.report` for what is written.
"""
