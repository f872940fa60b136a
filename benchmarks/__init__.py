"""Hand-run benchmarks; never imported by the tests or CI."""
