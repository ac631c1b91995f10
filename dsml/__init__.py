"""dsml: a small distributed storage and job cluster for machine-learning work."""

__version__ = "0.1.0"
