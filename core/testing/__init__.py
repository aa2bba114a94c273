"""Test helpers for lvlmva and its plugins: tiny data, tiny models, a scripted OpenAI-compatible server, a tiny image-text-to-text model."""
