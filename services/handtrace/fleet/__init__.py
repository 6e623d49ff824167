"""handtrace.fleet: agent heartbeats -> Prometheus fleet-impact metrics and a ClickHouse
``heartbeats`` table (worst offenders); also watches the pipeline's consumer lag and the
sampling rates in force, which the stream and sink cannot report about themselves."""
