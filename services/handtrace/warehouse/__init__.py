"""The warehouse people can trust (issue #14): access tiers and the access audit (``tiers``).

Kept light: importing the package loads nothing; ``handtrace.warehouse.tiers`` holds the rules.
"""
