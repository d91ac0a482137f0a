"""The loss benchmark: `vapo-bench --suite loss` (vapo_kernels/bench/suites/loss.py), kept so
that `python benchmarks/bench_loss.py [options]` still works. Options: `vapo-bench --help`."""

import sys

from vapo_kernels.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "loss", *sys.argv[1:]]))
