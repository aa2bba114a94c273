"""Built-in mitigators."""
