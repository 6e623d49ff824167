"""X11 capture backend: input through pynput's RECORD listeners, the focused window through Xlib.

Input: pynput's xorg backend records device events of all clients with the X RECORD extension,
on two connections of its own, from two listener threads that call :meth:`X11Source.start`'s
``emit`` directly. Each callback maps pynput's view onto the raw-event contract of
:mod:`handtrace.agent.capture`:

- ``key_code`` is the X11 keysym (pynput's ``KeyCode.vk`` on xorg; ``Key.*`` members carry it
  as ``.value.vk``); a key that pynput only gives as a character gets that character's keysym.
  A ``key_up`` repeats its ``key_down``'s keysym (matched by X keycode), although X would
  report "h" for an "H" whose shift was released first;
- ``modifiers`` is tracked here from modifier key downs and ups (Shift_L/R 1, Control_L/R 2,
  Alt_L/R 4, Super_L/R and Meta_L/R 8; AltGr is a character-level shift, not a modifier),
  excluding the key itself; a modifier held down before :meth:`X11Source.start` is unknown;
- ``text`` is set on ``key_down`` only, for a key that produced a printable character with no
  ctrl/alt/meta held -- ctrl+s is a command, not typed text (the synthetic source's convention);
- wheel buttons become ``scroll`` notches: pynput reports button 4 (wheel up) as dy=+1 and 5
  (wheel down) as dy=-1; our convention is positive towards the end of the document, so the
  sign of dy is flipped; buttons 6/7 (left/right) keep pynput's dx sign (right positive).

Which display: ``X11Source(display=":1")``, else ``$DISPLAY``. pynput has no display argument:
its backend opens ``Xlib.display.Display()`` (which reads ``$DISPLAY``) when it is first
imported and again when each listener thread starts. :meth:`X11Source.start` therefore sets
``DISPLAY`` to the wanted display, under a process-wide lock, only while it imports pynput and
until both listeners have opened their connections, then restores the previous value. Other
threads of the process that read ``DISPLAY`` during those few milliseconds see our display.

Wayland: under XWayland, RECORD only sees input that goes to X11 clients; run an X session.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import Xlib.display
import Xlib.error
import Xlib.X
import Xlib.Xatom
from Xlib.protocol import rq

from handtrace.agent.capture import CaptureUnavailable, Emit, Event, WindowInfo
from handtrace.core.clock import now_us

log = logging.getLogger(__name__)

SHIFT, CTRL, ALT, META = 1, 2, 4, 8
MODIFIER_KEYSYMS: dict[int, int] = {
    0xFFE1: SHIFT,  # Shift_L
    0xFFE2: SHIFT,  # Shift_R
    0xFFE3: CTRL,  # Control_L
    0xFFE4: CTRL,  # Control_R
    0xFFE7: META,  # Meta_L
    0xFFE8: META,  # Meta_R
    0xFFE9: ALT,  # Alt_L
    0xFFEA: ALT,  # Alt_R
    0xFFEB: META,  # Super_L
    0xFFEC: META,  # Super_R
}
"""Keysyms of the modifier keys and their bit in ``modifiers``."""

_COMMAND_MODIFIERS = CTRL | ALT | META
_BUTTONS = {1: "left", 2: "middle", 3: "right"}
_MAX_TREE_DEPTH = 32
_MAX_SEARCH_NODES = 256

# pynput reads $DISPLAY from the environment; one start at a time may point it elsewhere.
_ENV_LOCK = threading.Lock()


class _GetRecordContext(rq.ReplyRequest):  # type: ignore[misc]
    """RECORD GetContext with the ``enabled`` flag, which python-xlib's own reply skips.

    Wire format from the RECORD extension protocol spec, section "GetContext".
    """

    _request = rq.Struct(
        rq.Card8("opcode"),
        rq.Opcode(4),
        rq.RequestLength(),
        rq.Card32("context"),
    )
    _reply = rq.Struct(
        rq.ReplyCode(),
        rq.Card8("enabled"),
        rq.Card16("sequence_number"),
        rq.ReplyLength(),
        rq.Card8("element_header"),
        rq.Pad(3),
        rq.Card32("n_clients"),
        rq.Pad(16),
        # The intercepted-clients list follows; we do not need it (and python-xlib 0.33 fails
        # to parse Record_ClientInfo in a reply), so it is left unparsed.
    )


@contextmanager
def _display_env(display: str) -> Iterator[None]:
    """Point ``$DISPLAY`` at ``display`` for the duration, restoring the previous value."""
    with _ENV_LOCK:
        old = os.environ.get("DISPLAY")
        os.environ["DISPLAY"] = display
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("DISPLAY", None)
            else:
                os.environ["DISPLAY"] = old


def _char_keysym(char: str) -> int:
    """The keysym of a character: Latin-1 maps to itself, the rest to 0x01000000 + code point."""
    cp = ord(char)
    return cp if 0x20 <= cp <= 0x7E or 0xA0 <= cp <= 0xFF else 0x01000000 | cp


def _decode_text(value: Any, utf8: bool) -> str:
    raw = value if isinstance(value, bytes | bytearray) else str(value).encode("latin-1", "replace")
    return bytes(raw).decode("utf-8" if utf8 else "latin-1", "replace")


class X11Source:
    """Capture backend for X11 sessions (Xorg, Xvfb); see the module docstring for the mapping."""

    name = "x11"

    def __init__(self, display: str | None = None, *, ready_timeout_s: float = 5.0) -> None:
        """Prepare a source; nothing is opened until :meth:`start` or :meth:`focused_window`.

        Args:
            display: X display name such as ``":0"``; None means ``$DISPLAY``.
            ready_timeout_s: How long :meth:`start` waits for the RECORD listeners to be live.
        """
        self._display_arg = display
        self._ready_timeout_s = ready_timeout_s
        self._emit: Emit | None = None
        self._listeners: list[Any] = []
        self._held: set[int] = set()
        self._keycode = 0
        self._down: dict[int, int | None] = {}
        self._held_lock = threading.Lock()  # keyboard state; also touched by start()
        self._x: Xlib.display.Display | None = None
        self._x_lock = threading.Lock()
        self._atoms: dict[str, int] = {}
        self._client_cache: dict[int, tuple[int, str | None]] = {}
        """visible_windows: top-level id -> (client id, WM_CLASS instance), per connection."""
        self._state_lock = threading.Lock()
        self.emit_errors = 0
        """Events lost because ``emit`` raised (the listeners keep running)."""

    @property
    def display(self) -> str:
        """The display name in use; raises :class:`CaptureUnavailable` if there is none."""
        name = self._display_arg or os.environ.get("DISPLAY")
        if not name:
            raise CaptureUnavailable(
                "no X display: pass X11Source(display=':0') or set DISPLAY "
                "(the x11 backend needs an X session; under Wayland it only sees XWayland clients)"
            )
        return name

    # ------------------------------------------------------------------ lifecycle

    def start(self, emit: Emit) -> None:
        """Start the RECORD listeners; returns once both record contexts are enabled.

        Raises:
            CaptureUnavailable: no display, the server lacks RECORD, or pynput cannot use it.
            RuntimeError: the source is already started.
        """
        with self._state_lock:
            if self._listeners:
                raise RuntimeError("X11Source is already started")
            display = self.display
            with self._x_lock:
                conn = self._connection()
                if not conn.has_extension("RECORD"):
                    raise CaptureUnavailable(
                        f"X display {display} lacks the RECORD extension that input capture needs "
                        "(Xorg: Load \"record\" in the Module section; Xvfb: +extension RECORD)"
                    )
            self._emit = emit
            self._held.clear()
            self._down.clear()
            try:
                self._start_listeners(display)
            except BaseException:
                self._stop_listeners()
                self._emit = None
                raise

    def _start_listeners(self, display: str) -> None:
        with _display_env(display):
            try:
                from pynput import keyboard, mouse
            except ImportError as e:
                raise CaptureUnavailable(f"pynput cannot use X display {display}: {e}") from e
            if not mouse.Listener.__module__.endswith("_xorg") or not keyboard.Listener.__module__.endswith("_xorg"):
                raise CaptureUnavailable(
                    f"pynput picked the {mouse.Listener.__module__} backend, not xorg; unset PYNPUT_BACKEND"
                )
            source = self

            class KeyboardListener(keyboard.Listener):  # type: ignore[misc]
                """pynput's listener, noting the X keycode of the event its callbacks describe."""

                def _handle_message(self, display: Any, event: Any, injected: bool) -> None:
                    source._keycode = event.detail
                    super()._handle_message(display, event, injected)

            self._listeners = [
                mouse.Listener(on_move=self._on_move, on_click=self._on_click, on_scroll=self._on_scroll),
                KeyboardListener(on_press=self._on_press, on_release=self._on_release),
            ]
            deadline = time.monotonic() + self._ready_timeout_s
            for listener in self._listeners:
                listener.start()
            # The listener threads open their Xlib connections (reading $DISPLAY) before they
            # create the record context, so DISPLAY may go back once every context exists.
            self._wait(deadline, lambda lst: hasattr(lst, "_context"), "create its RECORD context")
        # pynput marks a listener ready *before* it enables its context; events in between are
        # lost, so ask the server until each context says it is enabled.
        with self._x_lock:
            conn = self._connection()
            opcode = conn.display.get_extension_major("RECORD")

            def enabled(lst: Any) -> bool:
                try:
                    return bool(_GetRecordContext(display=conn.display, opcode=opcode, context=lst._context).enabled)
                except Xlib.error.XError:
                    # RECORD's BadContext: pynput has allocated the id on its own connection but
                    # the server has not seen the CreateContext yet (seen ~1 in 40 starts): ask again.
                    return False

            self._wait(deadline, enabled, "enable its RECORD context")

    def _wait(self, deadline: float, ready: Callable[[Any], bool], what: str) -> None:
        for listener in self._listeners:
            which = type(listener).__module__
            while not ready(listener):
                if not listener.is_alive():
                    raise CaptureUnavailable(f"the pynput {which} listener died before it could {what}")
                if time.monotonic() > deadline:
                    raise CaptureUnavailable(
                        f"the pynput {which} listener did not {what} within {self._ready_timeout_s} s"
                    )
                time.sleep(0.005)

    def stop(self) -> None:
        """Stop both listeners, join their threads and close the Xlib connection; idempotent."""
        with self._state_lock:
            self._stop_listeners()
            self._emit = None
            with self._x_lock:
                if self._x is not None:
                    try:
                        self._x.close()
                    except Exception:  # noqa: BLE001 - the server may already be gone
                        log.debug("closing the X connection failed", exc_info=True)
                    self._x = None
                    self._atoms.clear()

    def _stop_listeners(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            try:
                listener.stop()
            except Exception:  # noqa: BLE001 - a dead X connection must not block stop()
                log.debug("stopping a pynput listener failed", exc_info=True)
        # pynput queues its DisableContext on the recording connection without flushing it, so
        # the listener thread stays blocked until the next input event arrives (pynput PR #583,
        # issue #75). Any client may disable a context: do it on our own connection, at once.
        with self._x_lock:
            for listener in listeners:
                context = getattr(listener, "_context", None)
                if context is None or self._x is None:
                    continue
                try:
                    self._x.record_disable_context(context)
                    self._x.sync()
                except Exception:  # noqa: BLE001 - the context or the server may be gone
                    log.debug("disabling a RECORD context failed", exc_info=True)
        for listener in listeners:
            if listener.ident is None:
                continue
            try:
                listener.join(5.0)
            except Exception:  # noqa: BLE001 - join re-raises the listener's own error
                log.warning("the pynput listener ended with an error", exc_info=True)
            if listener.is_alive():
                log.warning("the pynput listener thread did not end within 5 s")

    # ------------------------------------------------------------------ input callbacks

    def _send(self, event: Event) -> None:
        emit = self._emit
        if emit is None:
            return
        try:
            emit(event)
        except Exception:  # noqa: BLE001 - an exception here would stop pynput's listener
            self.emit_errors += 1
            if self.emit_errors == 1:
                log.exception("emit raised; the event is lost (further failures are only counted)")

    def _on_move(self, x: int, y: int, injected: bool = False) -> None:
        self._send({"kind": "pointer_move", "captured_at_us": now_us(), "x": int(x), "y": int(y)})

    def _on_click(self, x: int, y: int, button: Any, pressed: bool, injected: bool = False) -> None:
        self._send(
            {
                "kind": "click",
                "captured_at_us": now_us(),
                "x": int(x),
                "y": int(y),
                "button": _BUTTONS.get(button.value, "other"),
                "pressed": bool(pressed),
            }
        )

    def _on_scroll(self, x: int, y: int, dx: int, dy: int, injected: bool = False) -> None:
        self._send(
            {
                "kind": "scroll",
                "captured_at_us": now_us(),
                "x": int(x),
                "y": int(y),
                "scroll_dx": int(dx),
                "scroll_dy": -int(dy),
            }
        )

    def _on_press(self, key: Any, injected: bool = False) -> None:
        self._key(key, "key_down")

    def _on_release(self, key: Any, injected: bool = False) -> None:
        self._key(key, "key_up")

    def _key(self, key: Any, kind: str) -> None:
        t = now_us()
        if key is None:  # pynput could not map the keycode
            code, char = None, None
        else:
            value = getattr(key, "value", key)  # Key.* members wrap a KeyCode
            code, char = value.vk, value.char
            if getattr(value, "is_dead", False):
                char = None
            if code is None and char:
                code = _char_keysym(char)
        with self._held_lock:
            # X reports a release with the keysym of the modifier state at release: "H" pressed
            # with shift and released after it comes back as "h". Report the key that went down.
            if kind == "key_down":
                self._down[self._keycode] = code
            elif self._keycode in self._down:
                code = self._down.pop(self._keycode)
            bit = MODIFIER_KEYSYMS.get(code or 0, 0)
            if bit:
                self._held.discard(code)
            mods = 0
            for held in self._held:
                mods |= MODIFIER_KEYSYMS[held]
            if bit and kind == "key_down":
                self._held.add(code)  # type: ignore[arg-type]
        event: Event = {"kind": kind, "captured_at_us": t, "key_code": code, "modifiers": mods}
        printable = char is not None and char.isprintable() and not bit
        event["text"] = char if kind == "key_down" and printable and not mods & _COMMAND_MODIFIERS else None
        self._send(event)

    # ------------------------------------------------------------------ focused window

    def _connection(self) -> Xlib.display.Display:
        """The shared Xlib connection (caller holds ``_x_lock``), opened on first use."""
        if self._x is None:
            display = self.display
            try:
                self._x = Xlib.display.Display(display)
            except Exception as e:  # noqa: BLE001 - python-xlib raises anything from DisplayError to OverflowError
                raise CaptureUnavailable(f"cannot open X display {display}: {e!r}") from e
            self._atoms.clear()
            self._client_cache.clear()
        return self._x

    def _atom(self, conn: Xlib.display.Display, name: str) -> int:
        atom = self._atoms.get(name)
        if atom is None:
            atom = self._atoms[name] = conn.intern_atom(name)
        return atom

    def focused_window(self) -> WindowInfo | None:
        """The focused top-level client window: EWMH ``_NET_ACTIVE_WINDOW`` when a window manager
        sets it, else ``XGetInputFocus`` walked to the window that carries ``WM_CLASS``.

        ``app_id`` is the WM_CLASS *instance* (its first string, e.g. ``code``,
        ``google-chrome``, ``gnome-terminal-server``), exactly as the app sets it -- the ids
        the allowlist policy names. ``title`` is ``_NET_WM_NAME`` (UTF-8), else ``WM_NAME``;
        ``geometry`` is the client window in root coordinates, without WM decorations; ``url``
        and ``password_field`` cannot be told on X11 and stay None/False.

        Raises:
            CaptureUnavailable: the display cannot be opened at all.
        """
        with self._x_lock:
            conn = self._connection()
            try:
                client = self._focused_client(conn)
                return None if client is None else self._describe(conn, client)
            except Xlib.error.ConnectionClosedError:
                # The server went away; drop the connection so a later call reconnects.
                self._x = None
                self._atoms.clear()
                return None
            except Xlib.error.XError:
                return None  # the window went away between two requests

    def visible_windows(self) -> list[WindowInfo] | None:
        """The viewable top-level windows, bottom-to-top, for masking frames (``agent.frames``).

        Stacking order is the order of the root's children in ``QueryTree`` (the X protocol
        lists them bottom to top), which holds with a window manager (its frames are the
        root's children) and without one (bare Xvfb has no ``_NET_CLIENT_LIST_STACKING``).
        Override-redirect windows (menus, tooltips, notifications) are included: they paint
        over others. InputOnly and unmapped windows are left out: they paint nothing.

        Each entry: ``geometry`` is the top-level window's *outer* rectangle in root
        coordinates (a WM frame with its decorations, borders included), ``app_id`` the
        WM_CLASS instance of the client in it (None when there is none: such a window is never
        allowlisted, so it is filled), ``window_id`` the client's id (matches
        :meth:`focused_window`), ``title`` and ``url`` None (a URL is known only for the
        focused window; ``agent.frames.stamp_focused`` copies it). A window that disappears
        during the walk is left out (it no longer paints). The top-level -> client lookup is
        cached by window id, pruned to the windows that still exist.

        Returns None when the list cannot be told (no display, server gone): the caller then
        fills the whole frame (fail closed).
        """
        with self._x_lock:
            try:
                conn = self._connection()
                root = conn.screen().root
                children = root.query_tree().children
            except CaptureUnavailable:
                return None
            except Xlib.error.ConnectionClosedError:
                self._x = None
                self._atoms.clear()
                return None
            except Xlib.error.XError:
                return None
            cache = self._client_cache
            out: list[WindowInfo] = []
            for top in children:
                try:
                    attrs = top.get_attributes()
                    if attrs.map_state != Xlib.X.IsViewable or attrs.win_class == Xlib.X.InputOnly:
                        continue
                    g = top.get_geometry()
                    known = cache.get(top.id)
                    if known is None:
                        client = self._client_of(conn, top, root)
                        known = (top.id if client is None else int(client.id), self._app_id(conn, client))
                        if client is not None:
                            cache[top.id] = known
                except Xlib.error.ConnectionClosedError:
                    self._x = None
                    self._atoms.clear()
                    return None
                except Xlib.error.XError:
                    continue  # destroyed while we looked: it no longer paints
                b = int(g.border_width)
                out.append(WindowInfo(app_id=known[1], title=None, window_id=known[0],
                                      geometry=(int(g.x), int(g.y), int(g.width) + 2 * b, int(g.height) + 2 * b)))
            alive = {int(c.id) for c in children}
            for wid in [w for w in cache if w not in alive]:
                del cache[wid]
            return out

    def _app_id(self, conn: Xlib.display.Display, client: Any | None) -> str | None:
        if client is None:
            return None
        wm_class = client.get_full_property(self._atom(conn, "WM_CLASS"), Xlib.X.AnyPropertyType)
        instance = _decode_text(wm_class.value, utf8=False).split("\0")[0] if wm_class else ""
        return instance or None

    def _focused_client(self, conn: Xlib.display.Display) -> Any | None:
        root = conn.screen().root
        active = root.get_full_property(self._atom(conn, "_NET_ACTIVE_WINDOW"), Xlib.Xatom.WINDOW)
        if active is not None and len(active.value) and active.value[0]:
            start = conn.create_resource_object("window", int(active.value[0]))
        else:
            focus = conn.get_input_focus().focus
            if isinstance(focus, int):
                if focus != Xlib.X.PointerRoot:
                    return None  # focus is None: nothing has it
                # Focus follows the pointer: the top-level window under it.
                child = root.query_pointer().child
                if isinstance(child, int) or not child.id:
                    return None
                start = child
            else:
                start = focus
        if start.id == root.id:
            return None
        return self._client_of(conn, start, root)

    def _client_of(self, conn: Xlib.display.Display, window: Any, root: Any) -> Any | None:
        wm_class = self._atom(conn, "WM_CLASS")
        w = window
        for _ in range(_MAX_TREE_DEPTH):
            if w.get_full_property(wm_class, Xlib.X.AnyPropertyType) is not None:
                return w
            parent = w.query_tree().parent
            if isinstance(parent, int) or not parent.id or parent.id == root.id:
                break
            w = parent
        # A top-level window without WM_CLASS is a window manager's frame: the client is below.
        queue, seen = [w], 0
        while queue and seen < _MAX_SEARCH_NODES:
            node = queue.pop(0)
            seen += 1
            if node.get_full_property(wm_class, Xlib.X.AnyPropertyType) is not None:
                return node
            queue.extend(node.query_tree().children)
        return None

    def _describe(self, conn: Xlib.display.Display, w: Any) -> WindowInfo:
        wm_class = w.get_full_property(self._atom(conn, "WM_CLASS"), Xlib.X.AnyPropertyType)
        instance = _decode_text(wm_class.value, utf8=False).split("\0")[0] if wm_class else ""
        utf8 = self._atom(conn, "UTF8_STRING")
        title: str | None = None
        net_name = w.get_full_property(self._atom(conn, "_NET_WM_NAME"), utf8)
        if net_name is not None:
            title = _decode_text(net_name.value, utf8=True)
        else:
            name = w.get_full_property(Xlib.Xatom.WM_NAME, Xlib.X.AnyPropertyType)
            if name is not None:
                title = _decode_text(name.value, utf8=name.property_type == utf8)
        geom = w.get_geometry()
        origin = conn.screen().root.translate_coords(w, 0, 0)
        return WindowInfo(
            app_id=instance or None,
            title=title,
            geometry=(int(origin.x), int(origin.y), int(geom.width), int(geom.height)),
            window_id=int(w.id),
        )
