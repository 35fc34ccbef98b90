"""dedn: the Dual Expert Distillation Network (IJCAI 2024) for generalized zero-shot learning."""

__version__ = "0.1.0"
