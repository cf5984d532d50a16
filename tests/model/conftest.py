"""Tiny model fixtures for the model tests."""

from tests.helpers.fixtures import tiny_family_dir, tiny_llama_dir, tiny_model_dir  # noqa: F401
