"""Peers' model code that is not on the package index, vendored for the converters' equivalence tests."""
