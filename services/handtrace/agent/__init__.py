"""handtrace.agent service."""
