"""Serving: a trained model as a torch-only artifact (``lightning-mtr export``) and scoring with it."""
