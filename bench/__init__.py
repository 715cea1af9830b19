"""Benchmarks, each one command printing side-by-side ratios: `make bench` (`python -m bench.engine_bench`),
`python -m bench.hotpath_bench`, `python -m bench.grpc_load`, and the prepared GPU check `bench/gpu/`."""
