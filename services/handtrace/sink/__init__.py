"""handtrace.sink service."""
