"""Evaluation: metrics, calibration, inference over features, localisation, baselines."""
