"""Prompt templates shipped with lvlmva (one file per dataset family and role)."""
