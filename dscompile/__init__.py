"""dscompile."""
