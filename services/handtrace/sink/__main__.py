"""`python -m handtrace.sink`: run the ClickHouse sink."""

from handtrace.sink.service import main

main()
