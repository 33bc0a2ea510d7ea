"""Built-in guests (``-f hello``)."""
