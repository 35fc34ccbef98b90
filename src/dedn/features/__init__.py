"""Image features: frozen backbones, extraction into feature stores, the built-in benchmark's cached features."""
