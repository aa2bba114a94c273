"""Built-in critics."""
