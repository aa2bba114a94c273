"""Built-in attributors."""
