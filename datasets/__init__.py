"""Dataset providers and their class specifications."""
