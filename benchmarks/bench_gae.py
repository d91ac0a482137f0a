"""The gae benchmark: `vapo-bench --suite gae` (vapo_kernels/bench/suites/gae.py), kept so
that `python benchmarks/bench_gae.py [options]` still works. Options: `vapo-bench --help`."""

import sys

from vapo_kernels.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "gae", *sys.argv[1:]]))
