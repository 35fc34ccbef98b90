"""Applications on top of the library: model selection, protocols, launchers, experiments and reports, prediction,
explanation, demo, benchmarks."""
