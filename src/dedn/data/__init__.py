"""The data layer: the dataset container, benchmark readers (xlsa17, HDF5), feature stores, generated benchmarks."""
