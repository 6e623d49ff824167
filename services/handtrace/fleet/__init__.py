"""handtrace.fleet service."""
