"""Demonstration frames benchmark: what recording costs a laptop, measured under a real X server.

    python -m bench.frame_capture [--seconds 60] [--sizes 1920x1080,1280x800] [--action-every 4]

For each screen size a fresh Xvfb runs a *screen driver* (a child process of its own, not
measured) with four real X windows drawn through the X protocol: an editor (``code``,
allowlisted: monospaced text, typing bursts at ~8 chars/s and scrolling), a browser (``firefox``,
allowlisted: a photo-like picture over proportional text, scrolling), a chat app (``slack``, not
allowlisted: new messages now and then, overlapping both) and a panel without WM_CLASS (filled).
A 20 s script repeats: type 6 s, pause, raise the browser and scroll it, a chat message, raise
the editor and scroll it, pause. Focus follows the raised window.

Each configuration then runs in its own child process for ``--seconds`` (one after the other,
same script):

1. ``idle``: the same imports and tick loop, nothing grabbed (the floor of a Python process);
2. ``grab``: the full-screen grab alone (mss, XShmGetImage) every ``frame_interval_s``: the baseline;
3. ``record-webp`` / ``record-png``: a real :class:`FrameCapturer` -- window list from
   ``X11Source.visible_windows`` (twice per grab) and the focused window, the local policy's
   decision, masking, dHash distinctness -- plus one action every ``--action-every`` seconds that
   selects (and so encodes) the frame before it, and the end frame.

Reported per configuration, from the child itself: CPU % of one core (process user + system CPU
seconds over wall seconds, after imports and the X connections are set up), peak RSS (VmHWM),
kept (distinct) frames/hour, selected frames/hour, bytes per selected frame and bytes/hour; and
the X server's own CPU % over the same span (it copies the pixels for the grab; it also draws
the driver's windows, which the ``idle`` row shows alone).

``--formats`` adds the encoder comparison behind ADR 0011: masked frames grabbed from the same
screens, encoded with PNG (zlib levels 1, 6, 9) and lossless WebP (method 0, 4, 6), reporting
encode and decode (PIL) milliseconds and bytes, and checking the round trip is pixel-exact.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from handtrace.core.procs import spawn_owned

ROOT = Path(__file__).resolve().parent.parent
CYCLE_S = 20.0
ALLOWED = frozenset({"code", "firefox"})
FONT_MONO = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"
FONT_SANS = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
WORDS = ("def return self frame window policy filled allowed event batch stream sink offset "
         "partition key value import from class with for while if else None True False async "
         "await yield lambda travel expense Berlin receipt hotel invoice total amount approve").split()


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------ the screen driver


def _font(path: str, size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return ImageFont.load_default()


def _code_canvas(w: int, h: int, rng: random.Random) -> Any:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), (250, 250, 248))
    d = ImageDraw.Draw(img)
    font = _font(FONT_MONO, 15)
    colours = [(30, 30, 30), (0, 90, 170), (160, 30, 120), (20, 120, 40), (120, 120, 120)]
    for i, y in enumerate(range(4, h - 20, 19)):
        d.text((6, y), f"{i + 1:4d}", fill=(150, 150, 150), font=font)
        x = 60 + 16 * rng.randrange(0, 4) * 2
        for _ in range(rng.randrange(2, 12)):
            word = rng.choice(WORDS)
            d.text((x, y), word, fill=rng.choice(colours), font=font)
            x += 9 * (len(word) + 1)
            if x > w - 80:
                break
    return img


def _page_canvas(w: int, h: int, rng: random.Random) -> Any:
    from PIL import Image, ImageDraw, ImageFilter

    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = _font(FONT_SANS, 16)
    title = _font(FONT_SANS, 28)
    y = 20
    while y < h - 40:
        if rng.random() < 0.35:  # a photo-like picture: fractal structure, smooth light, grain
            pw, ph = min(w - 40, 900), 360
            photo = Image.merge("RGB", [
                Image.effect_mandelbrot((pw, ph), (-2.0 + c * 0.1, -1.2, 1.0, 1.2), 80 + 40 * c) for c in range(3)])
            light = Image.linear_gradient("L").resize((pw, ph)).convert("RGB")
            photo = Image.blend(photo, light, 0.35).filter(ImageFilter.GaussianBlur(2))
            grain = Image.effect_noise((pw, ph), 24).convert("RGB")
            photo = Image.blend(photo, grain, 0.12)
            img.paste(photo, (20, y))
            y += ph + 20
        else:
            d.text((20, y), " ".join(rng.choice(WORDS) for _ in range(5)).title(), fill=(20, 20, 20), font=title)
            y += 44
            for _ in range(rng.randrange(3, 9)):
                d.text((20, y), " ".join(rng.choice(WORDS) for _ in range(w // 70)), fill=(50, 50, 50), font=font)
                y += 24
            y += 16
    return img


def _chat_canvas(w: int, h: int, rng: random.Random) -> Any:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), (245, 240, 250))
    d = ImageDraw.Draw(img)
    font = _font(FONT_SANS, 14)
    for y in range(10, h - 30, 46):
        x = 10 if rng.random() < 0.5 else w // 3
        d.rounded_rectangle((x, y, x + w * 2 // 3 - 20, y + 38), 8, fill=(220, 210, 240))
        d.text((x + 8, y + 10), " ".join(rng.choice(WORDS) for _ in range(6)), fill=(30, 30, 30), font=font)
    return img


class _Win:
    def __init__(self, conn: Any, geom: tuple[int, int, int, int], wm_class: tuple[str, str] | None) -> None:
        import Xlib.X

        screen = conn.screen()
        self.conn, self.geom = conn, geom
        x, y, w, h = geom
        self.win = screen.root.create_window(x, y, w, h, 0, screen.root_depth, background_pixel=screen.white_pixel)
        if wm_class:
            self.win.set_wm_class(*wm_class)
        self.gc = self.win.create_gc()
        self.win.map()
        conn.sync()
        self.X = Xlib.X

    def put(self, img: Any, x: int = 0, y: int = 0) -> None:
        data = img.tobytes("raw", "BGRX")
        w, h = img.size
        rows = max(1, 200_000 // (w * 4))
        for r in range(0, h, rows):
            n = min(rows, h - r)
            self.win.put_image(self.gc, x, y + r, w, n, self.X.ZPixmap, 24, 0, data[r * w * 4:(r + n) * w * 4])

    def raise_and_focus(self) -> None:
        self.win.configure(stack_mode=self.X.Above)
        self.win.set_input_focus(self.X.RevertToParent, self.X.CurrentTime)


def driver(display: str, seconds: float, ready: Path) -> None:
    """Draw the windows and run the script until ``seconds`` have passed (see the docstring)."""
    import Xlib.display
    from PIL import Image, ImageDraw

    rng = random.Random(1)
    conn = Xlib.display.Display(display)
    sw, sh = conn.screen().width_in_pixels, conn.screen().height_in_pixels
    panel_h = 36
    editor = _Win(conn, (0, 0, sw * 5 // 8, sh - panel_h), ("code", "Code"))
    browser = _Win(conn, (sw * 3 // 10, 0, sw * 7 // 10, sh - panel_h), ("firefox", "Firefox"))
    chat = _Win(conn, (sw * 3 // 4, sh // 3, sw // 4, sh // 2), ("slack", "Slack"))
    panel = _Win(conn, (0, sh - panel_h, sw, panel_h), None)
    code = _code_canvas(editor.geom[2], editor.geom[3] * 3, rng)
    page = _page_canvas(browser.geom[2], browser.geom[3] * 3, rng)
    talk = _chat_canvas(chat.geom[2], chat.geom[3] * 2, rng)
    panel.put(Image.new("RGB", (sw, panel_h), (40, 44, 52)))
    offsets = {"code": 0, "page": 0, "talk": 0}

    def show(win: _Win, canvas: Any, key: str) -> None:
        w, h = win.geom[2], win.geom[3]
        off = offsets[key] % (canvas.height - h)
        win.put(canvas.crop((0, off, w, off + h)))

    show(editor, code, "code")
    show(browser, page, "page")
    show(chat, talk, "talk")
    editor.raise_and_focus()
    conn.sync()
    font = _font(FONT_MONO, 15)
    cursor = [60, 4 + 19 * 12]
    ready.write_text("ok")
    t0 = time.monotonic()
    last_phase = -1.0
    while (elapsed := time.monotonic() - t0) < seconds:
        phase = elapsed % CYCLE_S
        if phase < 6:  # typing in the editor, ~8 chars/s
            ch = Image.new("RGB", (9, 18), (250, 250, 248))
            ImageDraw.Draw(ch).text((0, 0), rng.choice("abcdefghijklmnopqrstuvwxyz  "), fill=(30, 30, 30), font=font)
            editor.put(ch, *cursor)
            cursor[0] += 9
            if cursor[0] > editor.geom[2] - 40:
                cursor[0], cursor[1] = 60, cursor[1] + 19
            conn.sync()
            time.sleep(0.12)
            continue
        step = int(phase)
        if step != int(last_phase):
            if step == 8:
                browser.raise_and_focus()
            elif step in (9, 10, 11):
                offsets["page"] += browser.geom[3] // 3
                show(browser, page, "page")
            elif step == 12:
                offsets["talk"] += 46
                show(chat, talk, "talk")
            elif step == 14:
                editor.raise_and_focus()
                cursor[1] = 4 + 19 * rng.randrange(5, 30)
            elif step in (15, 16, 17):
                offsets["code"] += 19 * 12
                show(editor, code, "code")
            conn.sync()
        last_phase = phase
        time.sleep(0.05)
    conn.close()


# ------------------------------------------------------------------------------ measured children


def child(mode: str, display: str, seconds: float, interval_s: float, action_every: float,
          ring: int | None = None) -> dict[str, Any]:
    """One configuration in this process; returns its numbers."""
    from handtrace.agent.capture import WindowInfo
    from handtrace.agent.frames import FrameCapturer, FrameConfig, ScreenGrab, stamp_focused
    from handtrace.agent.localpolicy import LocalPolicy
    from handtrace.agent.sources.x11 import X11Source
    from handtrace.core.clock import now_us
    from handtrace.core.policy import Policy

    src = X11Source(display=display)
    grab = ScreenGrab(display)
    local = LocalPolicy(Policy(version=1, allowed_apps=ALLOWED))

    def decide(w: WindowInfo) -> tuple[bool, str | None]:
        d = local.window(w)
        return d.allowed, d.url

    fmt = mode.split("-")[1] if mode.startswith("record-") else "webp"
    from handtrace.core.settings import DemoSettings

    cfg = FrameConfig.from_settings(DemoSettings())
    cfg = cfg.model_copy(update={"interval_s": interval_s, "format": fmt, "ring": ring or cfg.ring})
    cap = FrameCapturer(cfg, grab,
                        lambda: stamp_focused(src.visible_windows(), src.focused_window()), decide)
    grab()  # connect before measuring
    src.focused_window()
    selected: dict[bytes, int] = {}
    grabs = 0
    cpu0, t0 = _cpu_s(), time.monotonic()
    next_grab, next_action = t0, t0 + action_every
    while (now := time.monotonic()) - t0 < seconds:
        if mode == "grab" and now >= next_grab:
            grab()
            grabs += 1
        elif mode.startswith("record"):
            src.focused_window()  # the agent polls focus on its tick anyway
            cap.poll(now_us())
            if now >= next_action:
                f = cap.frame_before(now_us())
                if f is not None:
                    selected[f.sha256] = len(f.image)
        if now >= next_grab:
            next_grab += interval_s
        if now >= next_action:
            next_action += action_every
        time.sleep(max(0.0, min(next_grab, next_action) - time.monotonic()))
    if mode.startswith("record"):
        f = cap.final_frame(now_us())
        if f is not None:
            selected[f.sha256] = len(f.image)
    wall = time.monotonic() - t0
    cpu = _cpu_s() - cpu0
    c = cap.counters
    per_h = 3600 / wall
    out = {"mode": mode, "wall_s": round(wall, 1), "cpu_pct": round(100 * cpu / wall, 2),
           "peak_rss_mb": round(_peak_rss_mb(), 1)}
    if mode == "grab":
        out["grabs"] = grabs
    if mode.startswith("record"):
        n = len(selected)
        out |= {"grabs": c.grabs, "kept": c.kept, "not_distinct": c.not_distinct, "unstable": c.unstable,
                "kept_per_h": round(c.kept * per_h), "selected": n, "selected_per_h": round(n * per_h),
                "encoded": c.encoded, "bytes_per_frame": round(sum(selected.values()) / max(1, n)),
                "mb_per_h": round(sum(selected.values()) * per_h / 1e6, 1)}
    grab.close()
    src.stop()
    return out


def formats(display: str, samples: int, gap_s: float) -> dict[str, Any]:
    """Encode masked frames of the running script with each candidate; times and sizes."""
    import numpy as np
    from PIL import Image

    from handtrace.agent.capture import WindowInfo
    from handtrace.agent.frames import ScreenGrab, apply_mask, compute_mask
    from handtrace.agent.localpolicy import LocalPolicy
    from handtrace.agent.sources.x11 import X11Source
    from handtrace.core.policy import Policy

    src = X11Source(display=display)
    grab = ScreenGrab(display)
    local = LocalPolicy(Policy(version=1, allowed_apps=ALLOWED))

    def decide(w: WindowInfo) -> tuple[bool, str | None]:
        d = local.window(w)
        return d.allowed, d.url

    candidates: dict[str, dict[str, Any]] = {
        "png-1": {"format": "PNG", "compress_level": 1},
        "png-rle": {"format": "PNG", "compress_level": 6, "compress_type": 3},  # zlib Z_RLE
        "png-6": {"format": "PNG", "compress_level": 6},
        "png-9": {"format": "PNG", "compress_level": 9},
        "webp-m0": {"format": "WEBP", "lossless": True, "quality": 0, "method": 0},
        "webp-m0q25": {"format": "WEBP", "lossless": True, "quality": 25, "method": 0},
        "webp-m1q10": {"format": "WEBP", "lossless": True, "quality": 10, "method": 1},
        "webp-m2q25": {"format": "WEBP", "lossless": True, "quality": 25, "method": 2},
        "webp-m4": {"format": "WEBP", "lossless": True, "quality": 50, "method": 4},
        "webp-m6": {"format": "WEBP", "lossless": True, "quality": 100, "method": 6},
    }
    stats = {k: {"enc_ms": 0.0, "dec_ms": 0.0, "bytes": 0} for k in candidates}
    for _ in range(samples):
        img = grab()
        assert img is not None
        img = img.copy()
        apply_mask(img, compute_mask(img.width, img.height, src.visible_windows(), decide))
        ref = np.asarray(img)
        for name, kw in candidates.items():
            buf = io.BytesIO()
            t = time.process_time()
            img.save(buf, **kw)
            stats[name]["enc_ms"] += (time.process_time() - t) * 1000
            t = time.process_time()
            back = Image.open(io.BytesIO(buf.getvalue()))
            back.load()
            stats[name]["dec_ms"] += (time.process_time() - t) * 1000
            assert np.array_equal(np.asarray(back.convert("RGB")), ref), f"{name} is not lossless"
            stats[name]["bytes"] += buf.tell()
        time.sleep(gap_s)
    grab.close()
    src.stop()
    return {k: {m: round(v / samples, 1) for m, v in s.items()} for k, s in stats.items()}


# ------------------------------------------------------------------------------------- parent


def _start_xvfb(width: int, height: int) -> tuple[subprocess.Popen[bytes], str]:
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise RuntimeError("Xvfb is not installed (apt-get install xvfb)")
    r, w = os.pipe()
    proc = spawn_owned([xvfb, "-displayfd", str(w), "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp",
                        "-noreset"], pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       start_new_session=True)
    os.close(w)
    try:
        digits = b""
        while not digits.endswith(b"\n"):
            chunk = os.read(r, 16)
            if not chunk:
                raise RuntimeError("Xvfb did not start")
            digits += chunk
    finally:
        os.close(r)
    return proc, f":{int(digits)}"


def _run_child(args: list[str], timeout: float) -> dict[str, Any]:
    p = spawn_owned([sys.executable, "-m", "bench.frame_capture", *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    out, _ = p.communicate(timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"child {args} failed ({p.returncode})")
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_size(width: int, height: int, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    xvfb, display = _start_xvfb(width, height)
    modes = a.modes.split(",")
    total = a.seconds * len(modes) + (30 if a.formats else 0) + 30
    ready = tmp / f"driver-{width}.ready"
    drv = spawn_owned([sys.executable, "-m", "bench.frame_capture", "--driver", display, "--seconds", str(total),
                       "--ready", str(ready)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if drv.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the screen driver did not start")
            time.sleep(0.1)
        rows = []
        for mode in modes:
            x0, w0 = _proc_cpu_s(xvfb.pid), time.monotonic()
            row = _run_child(["--child", mode, display, "--seconds", str(a.seconds), "--interval", str(a.interval),
                              "--action-every", str(a.action_every), *(["--ring", str(a.ring)] if a.ring else [])],
                             timeout=a.seconds + 120)
            row["xserver_cpu_pct"] = round(100 * (_proc_cpu_s(xvfb.pid) - x0) / (time.monotonic() - w0), 2)
            rows.append(row)
        fmts = _run_child(["--formats-child", display], timeout=300) if a.formats else None
        return {"size": f"{width}x{height}", "rows": rows, "formats": fmts}
    finally:
        drv.kill()
        drv.wait(10)
        os.killpg(xvfb.pid, signal.SIGKILL)
        xvfb.wait(10)


def report(results: list[dict[str, Any]], a: argparse.Namespace) -> str:
    lines = [f"frame capture, {a.seconds:g} s per configuration, frame_interval_s={a.interval:g}, "
             f"one action every {a.action_every:g} s, {os.cpu_count()} cores"]
    for res in results:
        rows = {r["mode"]: r for r in res["rows"]}
        base = rows.get("grab", {"cpu_pct": 0})
        lines.append(f"\n{res['size']}:")
        lines.append(f"  {'config':<12} {'CPU %':>6} {'x grab':>7} {'X srv %':>7} {'RSS MB':>7} {'kept/h':>7} "
                     f"{'sel/h':>6} {'B/frame':>8} {'MB/h':>6}")
        for m, r in rows.items():
            ratio = r["cpu_pct"] / base["cpu_pct"] if base["cpu_pct"] else float("nan")
            lines.append(f"  {m:<12} {r['cpu_pct']:>6.2f} {ratio:>7.2f} {r['xserver_cpu_pct']:>7.2f} "
                         f"{r['peak_rss_mb']:>7.1f} {r.get('kept_per_h', ''):>7} {r.get('selected_per_h', ''):>6} "
                         f"{r.get('bytes_per_frame', ''):>8} {r.get('mb_per_h', ''):>6}")
        if res["formats"]:
            f = res["formats"]
            ref = f["png-6"]
            lines.append("  encoder      enc ms  dec ms     bytes  size vs png-6")
            for name, s in f.items():
                lines.append(f"  {name:<10} {s['enc_ms']:>8.1f} {s['dec_ms']:>7.1f} {s['bytes']:>9.0f} "
                             f"{s['bytes'] / ref['bytes']:>8.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--sizes", default="1920x1080,1280x800")
    p.add_argument("--interval", type=float, default=None, help="frame_interval_s (default: DemoSettings)")
    p.add_argument("--action-every", type=float, default=4.0)
    p.add_argument("--formats", action="store_true", help="also compare PNG and lossless WebP (ADR 0011)")
    p.add_argument("--modes", default="idle,grab,record-webp,record-png")
    p.add_argument("--ring", type=int, default=None, help="frame_ring (default: DemoSettings)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--driver", help=argparse.SUPPRESS)
    p.add_argument("--ready", help=argparse.SUPPRESS)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--formats-child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.interval is None:
        from handtrace.core.settings import DemoSettings

        a.interval = DemoSettings().frame_interval_s
    if a.driver:
        driver(a.driver, a.seconds, Path(a.ready))
        return
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.seconds, a.interval, a.action_every, a.ring)))
        return
    if a.formats_child:
        print(json.dumps(formats(a.formats_child, samples=10, gap_s=2.0)))
        return
    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            w, h = (int(v) for v in size.split("x"))
            results.append(run_size(w, h, a, Path(tmp)))
    print(json.dumps(results) if a.json else report(results, a))


if __name__ == "__main__":
    main()
