"""Built-in aligners."""
