"""Test harnesses: the whole cluster in one process on a fake clock (:mod:`dsml.testing.sim`)."""
