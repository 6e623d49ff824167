"""`python -m handtrace.stream`: run one stream worker."""

from handtrace.stream.app import main

main()
