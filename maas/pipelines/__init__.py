"""Pipelines: several models and steps composed into one served "model" (docs/pipelines.md)."""
