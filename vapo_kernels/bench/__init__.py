"""Benchmarks as data: one harness (``harness``), declarative suites (``suites``), the
``vapo-bench`` command (``cli``) and its report folder (``report``)."""
