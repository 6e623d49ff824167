"""handtrace.control service."""
