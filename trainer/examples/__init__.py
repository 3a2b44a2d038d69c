"""Models and data for the example configs in ``configs/``."""
