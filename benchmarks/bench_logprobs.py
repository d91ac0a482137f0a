"""The logprobs benchmark: `vapo-bench --suite logprobs` (vapo_kernels/bench/suites/logprobs.py), kept so
that `python benchmarks/bench_logprobs.py [options]` still works. Options: `vapo-bench --help`."""

import sys

from vapo_kernels.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "logprobs", *sys.argv[1:]]))
