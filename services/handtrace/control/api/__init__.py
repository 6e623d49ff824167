# STUB for the portal branch: the api branch's version replaces this file
"""The control-plane HTTP API and the people's portal (docs/design/control-plane.md)."""
