"""neuronml_fast microbenchmarks. `make bench` (= `python -m bench`) or `pytest bench/ --benchmark-only`.

One list of cases (`bench.cases.CASES`) feeds both the CLI and pytest-benchmark.
"""
