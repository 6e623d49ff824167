"""`python -m handtrace.fleet`: run the fleet exporter."""

from handtrace.fleet.service import main

main()
