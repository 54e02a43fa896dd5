"""Serving: turn a trained checkpoint into a torch-only artifact and score with it."""
