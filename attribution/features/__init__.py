"""Frozen feature extractors behind one registry, and their on-disk cache."""
