"""Integrations with model libraries (imported on demand, so their packages stay optional)."""
