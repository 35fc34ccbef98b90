"""Applications on top of the library: protocols, experiments and reports, prediction, explanation, demo, benchmarks."""
