"""Tests that run in the openpi environment (a package, so its conftest does not shadow tests/conftest.py)."""
