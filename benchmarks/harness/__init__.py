"""Benchmarks: matrices of runs (``matrix``), run in parallel (``runner``), summarised from their
results files (``summary``) into report.md (``markdown``) and plots (``plots``) by ``report``."""
