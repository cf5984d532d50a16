"""Shared test helpers: tiny models and their fixtures."""
