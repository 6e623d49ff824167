"""The agent's local control socket: `handtrace pause|resume|status|exemption request` and
`handtrace record ...` (demonstrations) talk to the running agent here.

A Unix domain socket in a directory only the user can open (0700), the socket itself 0600: it is
not reachable from the network, and on Linux the server also checks the peer's uid
(SO_PEERCRED) so another local user cannot pause someone else's capture. One JSON request per
connection, one JSON reply: ``{"cmd": "pause", "minutes": 10}`` ->
``{"ok": true, "until_us": ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from handtrace.agent.runtime import Agent, AgentError

_MAX_REQUEST = 64 * 1024
RECORD_COMMANDS = ("record_start", "record_stop", "record_list", "record_show", "record_trim", "record_delete",
                   "record_submit")


class AgentNotRunning(RuntimeError):
    """No agent listens on the socket; the message says how to start one."""


def _peer_uid(conn: socket.socket) -> int | None:
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


class ControlServer:
    """Serves control requests for ``agent`` on ``path`` in a background thread."""

    def __init__(self, agent: Agent, path: Path, *, uploader: Any | None = None) -> None:
        self.agent = agent
        self.path = path
        self.uploader = uploader
        """agent/demo_upload.DemoUploader: its state is part of `status` (why uploads wait)."""
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if self.path.exists():
            try:  # a live agent answers; a stale socket file from a crash is replaced
                request(self.path, {"cmd": "ping"}, timeout_s=1.0)
            except AgentNotRunning:
                self.path.unlink()
            else:
                raise AgentError(f"another agent is already running on {self.path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(8)
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="agent-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _serve(self) -> None:
        sock = self._sock
        while sock is not None and not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    reply = self._handle(conn)
                except Exception as e:  # noqa: BLE001 -- a bad request never stops the agent
                    reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass

    def _handle(self, conn: socket.socket) -> dict[str, Any]:
        uid = _peer_uid(conn)
        if uid is not None and uid not in (os.getuid(), 0):
            return {"ok": False, "error": "only the user running the agent may control it"}
        data = b""
        while not data.endswith(b"\n") and len(data) < _MAX_REQUEST:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        try:
            req = json.loads(data or b"{}")
        except json.JSONDecodeError:
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(req, dict):
            return {"ok": False, "error": "request must be a JSON object"}
        return self.dispatch(req)

    def dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        """Carry out one request (also used by tests without a socket)."""
        cmd = req.get("cmd")
        try:
            if cmd == "ping":
                return {"ok": True}
            if cmd == "status":
                st = self.agent.status().as_dict()
                if self.agent.recorder is not None:
                    st["demonstrations"] = self.agent.recorder.status()
                    if self.uploader is not None:
                        st["demonstrations"]["upload"] = self.uploader.status()
                return {"ok": True, "status": st}
            if isinstance(cmd, str) and cmd.startswith("record_"):
                return self._record(cmd, req)
            if cmd == "pause":
                minutes = req.get("minutes")
                if isinstance(minutes, bool) or not isinstance(minutes, int | float):
                    return {"ok": False, "error": "pause needs a number of minutes"}
                until = self.agent.pause(float(minutes), reason=str(req.get("reason", "")))
                return {"ok": True, "until_us": until}
            if cmd == "resume":
                self.agent.resume()
                return {"ok": True}
            if cmd == "exemption_request":
                self.agent.request_exemption(str(req.get("reason", "")))
                return {"ok": True}
        except AgentError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": False, "error": f"unknown command {cmd!r} (ping, status, pause, resume, exemption_request, "
                                      f"{', '.join(RECORD_COMMANDS)})"}

    def _record(self, cmd: str, req: dict[str, Any]) -> dict[str, Any]:
        """Demonstrations (issue #11): ``record_start {instruction}``, ``record_stop``,
        ``record_list``, ``record_show {id}``, ``record_trim {id, steps | from_s/to_s}``,
        ``record_delete {id}``, ``record_submit {id}``; ``id`` may be a unique prefix."""
        rec = self.agent.recorder
        if rec is None:
            return {"ok": False, "error": "demonstrations are not available in this agent"}
        rid = str(req.get("id", ""))
        if cmd == "record_start":
            return {"ok": True, "recording": rec.start(str(req.get("instruction", "")))}
        if cmd == "record_stop":
            return {"ok": True, "recording": rec.stop()}
        if cmd == "record_list":
            return {"ok": True, "recordings": rec.recordings()}
        if cmd == "record_show":
            return {"ok": True, "recording": rec.show(rid)}
        if cmd == "record_trim":
            steps, from_s, to_s = req.get("steps"), req.get("from_s"), req.get("to_s")
            if steps is not None and (not isinstance(steps, list)
                                      or not all(isinstance(i, int) and not isinstance(i, bool) for i in steps)):
                return {"ok": False, "error": "steps must be a list of step numbers (e.g. 3,5)"}
            for name, v in (("from", from_s), ("to", to_s)):
                if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                    return {"ok": False, "error": f"--{name} must be seconds from the start of the recording"}
            return {"ok": True, "recording": rec.trim(rid, steps=steps, from_s=from_s, to_s=to_s)}
        if cmd == "record_delete":
            return {"ok": True, "recording": rec.delete(rid)}
        if cmd == "record_submit":
            return {"ok": True, "recording": rec.submit(rid)}
        return {"ok": False, "error": f"unknown command {cmd!r} ({', '.join(RECORD_COMMANDS)})"}


def request(path: Path, req: dict[str, Any], *, timeout_s: float = 5.0) -> dict[str, Any]:
    """Send one request to the agent on ``path`` and return its reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise AgentNotRunning(f"no handtrace agent is running (nothing listens on {path}); "
                                  "start it with `handtrace agent run`") from e
        sock.sendall(json.dumps(req).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    if not data:
        raise AgentNotRunning(f"the agent on {path} closed the connection without a reply")
    reply: dict[str, Any] = json.loads(data)
    return reply
