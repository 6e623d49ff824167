"""The control-plane HTTP API and portal (docs/design/control-plane.md, ADR 0013): the only
issuer of authoritative controls. Import :func:`handtrace.control.api.app.create_app`; this
package module imports nothing heavy."""
