"""What a run needs around the algorithms: configs, model loading, data, the layer-by-layer
driver, perplexity, metrics files and tracking. `runners/run.py` is the thin Hydra entry point."""

import os

# OpenMP's idle threads spin-wait ~300k iterations (libgomp's default) before they sleep. On a
# shared CPU the spinning thread takes the core the thread it waits for needs: GPTQ's 2-bit
# quantization of the bundled model took 1.82x its quiet time beside one busy process (spin
# default), 1.34x with 10k spins, and the quiet time did not move (81-83 s); OMP_WAIT_POLICY=
# PASSIVE gave 1.14x but 20% slower when quiet (docs/benchmarks.md). It takes effect only if set
# before torch loads libgomp: every entry point (runners/run.py, runners/plan.py, the tests'
# conftest) imports this package first. A value the user set wins. Thread counts do not change,
# so neither do the codes.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
