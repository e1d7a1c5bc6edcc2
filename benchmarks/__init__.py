"""Benchmarks (`gq bench ...`) and the GPU check (`gq gpu-check`).

Each prints its figures against a baseline measured in the same run."""
