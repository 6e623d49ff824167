"""handtrace.stream service."""
