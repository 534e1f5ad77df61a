"""dsv4rt."""
