"""Operators: one per deploy stage, thin and declarative over the engine in ``include/``."""
