"""Local policy: what the agent may capture at all, decided *before* an event is buffered, written
to disk or sent. Same rules as the stream's enforcement (the stream proves them again):

- no policy yet -> nothing is captured (fails closed);
- the focused window must belong to an allowlisted app (exact ``app_id``), and when the window
  shows a URL its host, as a browser connects to it (UTS-46/IDNA 2008), must be within an
  allowlisted registrable domain by the Public Suffix List (``handtrace.core.domains``, shared
  with the stream: ``docs.google.com.evil.net`` is not ``google.com``, ``faß.de`` is not
  ``fass.de``, a public-suffix entry admits nothing); the stored URL keeps scheme, host, port and
  path only;
- typed content per app (``Policy.text_capture``, ``*`` default, none when unset):
  ``full`` keeps the character; ``masked`` keeps the typing rhythm with every character as
  ``•``; ``none`` keeps only the timing. In both the keysym of a character key becomes
  ``MASKED_KEYSYM`` (a keysym spells the character): the stream's own representation of masked
  keys, which its validation accepts (a key event needs a key code). Shortcuts (a key with
  ctrl, alt or meta held) are always kept as shortcuts (keysym and modifiers, no text).
  Non-printing keys (Return, BackSpace, arrows, modifiers) keep their keysym. In a password
  field (the backend says so, or the window looks like a password prompt or manager:
  ``handtrace.core.pii.password_context``) nothing of a keystroke is kept;
- window titles and URLs are stamped with PII and secrets redacted (the stream's detectors,
  ``handtrace.core.pii``), so they never leave the laptop;
- source-side sampling: policy selectors prefixed ``agent:`` (``agent:kind:pointer_move``,
  ``agent:app:slack``, ``agent:*``) thin events on the laptop, where it saves battery and
  bandwidth. The stream ignores ``agent:`` selectors (unknown prefixes are forward compatible), so
  a rate is never applied twice; stream selectors without the prefix are the proof-side volume
  control. The unit is an episode (device, ``floor(t / episode_s)``), kept or dropped whole.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import lru_cache

from handtrace.agent.capture import Event, WindowInfo
from handtrace.core.domains import INVALID_URL as INVALID_URL  # re-exported: the drop reasons are shared
from handtrace.core.domains import NOT_ALLOWLISTED_DOMAIN as NOT_ALLOWLISTED_DOMAIN
from handtrace.core.domains import normalised_domains, url_verdict
from handtrace.core.pii import MASK_CHAR, MASKED_KEYSYM, password_context, redact_text, redact_url
from handtrace.core.policy import Policy, TextCapture

CTRL, ALT, META = 2, 4, 8
SHORTCUT_MODIFIERS = CTRL | ALT | META

NO_POLICY = "no_policy"
NO_APP_CONTEXT = "no_app_context"
NOT_ALLOWLISTED_APP = "not_allowlisted_app"
PASSWORD_FIELD = "password_field"  # noqa: S105 -- a drop reason, not a secret
SAMPLED_OUT = "sampled_out"


@dataclass(frozen=True)
class WindowDecision:
    """Whether events in a window may be captured, and how its typed content is treated."""

    allowed: bool
    reason: str | None
    text: TextCapture = "none"
    url: str | None = None
    """The URL to stamp (query, fragment and userinfo removed, PII redacted)."""


class LocalPolicy:
    """The policy in force on this laptop (``None``: none received yet, capture nothing)."""

    def __init__(self, policy: Policy | None, *, episode_s: int = 600) -> None:
        self.policy = policy
        self.episode_s = episode_s
        self._domains = normalised_domains(policy.allowed_domains) if policy else ()
        self._decide = lru_cache(maxsize=1024)(self._decide_uncached)
        self._rates = {k[len("agent:"):]: float(v) for k, v in (policy.sampling if policy else {}).items()
                       if k.startswith("agent:")}

    @property
    def version(self) -> int:
        """Version of the policy in force (0: none)."""
        return self.policy.version if self.policy else 0

    def window(self, w: WindowInfo | None) -> WindowDecision:
        """The decision for events in the focused window ``w``."""
        if w is None:
            return WindowDecision(False, NO_APP_CONTEXT if self.policy else NO_POLICY)
        return self._decide(w.app_id, w.url)

    def _decide_uncached(self, app_id: str | None, url: str | None) -> WindowDecision:
        p = self.policy
        if p is None:
            return WindowDecision(False, NO_POLICY)
        if not app_id:
            return WindowDecision(False, NO_APP_CONTEXT)
        if app_id not in p.allowed_apps:
            return WindowDecision(False, NOT_ALLOWLISTED_APP)
        clean = None
        if url is not None:
            reason, stored = url_verdict(url, self._domains)
            if stored is None:
                return WindowDecision(False, reason)
            clean = redact_url(stored)[0]
        return WindowDecision(True, None, p.text_capture_for(app_id), clean)

    @staticmethod
    @lru_cache(maxsize=512)
    def clean_title(title: str | None) -> str | None:
        """A window title with PII and secrets replaced by ``[REDACTED:kind]`` (the stream's
        detectors): addresses in a mail client's title never leave the laptop."""
        return redact_text(title)[0] if title else title

    @staticmethod
    def password_context(w: WindowInfo) -> bool:
        """The backend says the focus is in a password field, or the window looks like a
        password prompt or manager (title / app heuristics shared with the stream)."""
        return w.password_field or password_context(w.app_id, w.title)

    def mask_key(self, ev: Event, text_mode: TextCapture, *, password_field: bool) -> Event | None:
        """``ev`` (a key event) as it may be kept under ``text_mode``; None when it must go."""
        if password_field:
            return None
        mods = ev.get("modifiers") or 0
        if mods & SHORTCUT_MODIFIERS:
            ev["text"] = None
            return ev
        text = ev.get("text")
        if text is None or text_mode == "full":
            return ev
        ev["key_code"] = MASKED_KEYSYM
        ev["text_masked"] = True
        ev["text"] = MASK_CHAR * len(text) if text_mode == "masked" else None
        return ev

    def sample_rate(self, kind: str, app_id: str | None) -> float:
        """Source-side rate for an event (``agent:`` selectors; app > kind > ``*``; 1.0 default)."""
        if not self._rates:
            return 1.0
        for sel in (f"app:{app_id}", f"kind:{kind}", "*"):
            if sel in self._rates:
                return min(1.0, max(0.0, self._rates[sel]))
        return 1.0

    def episode_draw(self, device_id: str, captured_at_us: int) -> float:
        """A uniform draw in [0, 1) fixed per (device, episode): the whole episode shares it."""
        window = captured_at_us // (self.episode_s * 1_000_000)
        digest = hashlib.blake2b(f"{device_id}\x00{window}".encode(), digest_size=8).digest()
        return int(struct.unpack(">Q", digest)[0]) / 2**64

    def keep_sampled(self, ev: Event, device_id: str) -> bool:
        """Whether source-side sampling keeps ``ev`` (stamped with its app)."""
        rate = self.sample_rate(ev["kind"], ev.get("app_id"))
        if rate >= 1.0:
            return True
        return self.episode_draw(device_id, ev["captured_at_us"]) < rate

