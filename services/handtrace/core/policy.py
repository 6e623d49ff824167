"""The global capture policy (allowlists, sampling, typed-content masking) as one immutable value,
read from the ``Policy`` record of a ``policy_update`` ControlEvent. The agent applies it before
capture; the stream enforces it again on everything that arrives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from handtrace.core.domains import normalised_domains

TextCapture = Literal["none", "masked", "full"]
MAX_PAUSE_US = 30 * 60 * 1_000_000


@dataclass(frozen=True)
class Policy:
    """Global capture policy. An empty allowlist allows nothing (fails closed)."""

    version: int = 0
    allowed_apps: frozenset[str] = frozenset()
    allowed_domains: tuple[str, ...] = ()
    sampling: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    text_capture: Mapping[str, TextCapture] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Policy:
        """From the Avro ``Policy`` record of a policy_update ControlEvent."""
        return cls(
            version=int(rec["version"]),
            allowed_apps=frozenset(rec.get("allowed_apps") or ()),
            # Normalised as hosts are (handtrace.core.domains); an entry the control plane would
            # refuse (a public suffix, an old policy's wildcard) is dropped: it admits nothing.
            allowed_domains=normalised_domains(rec.get("allowed_domains") or ()),
            sampling=MappingProxyType(dict(rec.get("sampling") or {})),
            text_capture=MappingProxyType(dict(rec.get("text_capture") or {})),
        )

    def text_capture_for(self, app_id: str | None) -> TextCapture:
        """Typed-content policy of an app (`*` is the default; none when unset)."""
        if app_id is not None and app_id in self.text_capture:
            return self.text_capture[app_id]
        return self.text_capture.get("*", "none")
