"""Built-in lvlm."""
