"""The prepared GPU check: one command that installs loraswap over a CUDA machine's preinstalled stack,
runs the GPU tests and the engine test suite on CUDA, then the CUDA engine bench (``check``); the
measurements themselves are in ``cuda_bench``. See ``bench/gpu/README.md``."""
