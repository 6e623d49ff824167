"""FrameCapturer without a display: masking properties, selection (no future leakage),
distinctness, fail closed, lossless encoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from handtrace.agent.capture import WindowInfo
from handtrace.agent.frames import (
    FILL_RGB,
    FrameCapturer,
    FrameConfig,
    PolicyDecide,
    compute_mask,
    encode,
    stamp_focused,
    subtract,
)
from handtrace.agent.screenshots import dhash, hamming
from handtrace.core.settings import DemoSettings

S = 1_000_000
T0 = 1_700_000_000 * S


def noise(width: int, height: int, seed: int) -> Image.Image:
    """Pixels that are never the fill colour (every channel >= 1) and differ per seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(1, 256, (height, width, 3), dtype=np.uint8))


def by_app(allowed: set[str]):  # noqa: ANN201
    return lambda w: (w.app_id in allowed, f"https://{w.app_id}.example/" if w.app_id in allowed else None)


def win(app: str | None, geometry: tuple[int, int, int, int] | None, wid: int = 0, **kw: object) -> WindowInfo:
    return WindowInfo(app_id=app, title=None, geometry=geometry, window_id=wid, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- rectangles

rects = st.tuples(st.integers(-50, 150), st.integers(-50, 150), st.integers(1, 160), st.integers(1, 160))


def cells(r: tuple[int, int, int, int]) -> set[tuple[int, int]]:
    return {(x, y) for x in range(r[0], r[0] + r[2]) for y in range(r[1], r[1] + r[3])}


@given(rects, rects)
@settings(max_examples=200, deadline=None)
def test_subtract_is_set_difference_in_disjoint_pieces(r, cut) -> None:  # noqa: ANN001
    pieces = subtract(r, cut)
    covered: list[tuple[int, int]] = [c for p in pieces for c in cells(p)]
    assert len(covered) == len(set(covered)), "pieces overlap"
    assert set(covered) == cells(r) - cells(cut)


# ------------------------------------------------------------------ masking: the privacy invariant

screens = st.tuples(st.integers(8, 64), st.integers(8, 48))
window_lists = st.lists(
    st.tuples(st.sampled_from(["ok", "no", "ok2", None]),
              st.tuples(st.integers(-20, 60), st.integers(-20, 50), st.integers(0, 50), st.integers(0, 40)),
              st.booleans()),
    max_size=7,
)


def oracle(width: int, height: int, ws: list[WindowInfo], allowed: set[str]) -> np.ndarray:
    """Per-pixel label by painting, independent of the rectangle algebra: -1 filled, i visible
    window index."""
    lab = np.full((height, width), -1, np.int32)
    for i, w in enumerate(ws):
        assert w.geometry is not None
        x, y, ww, hh = w.geometry
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + ww, width), min(y + hh, height)
        if x1 > x0 and y1 > y0:
            lab[y0:y1, x0:x1] = i if (w.app_id in allowed and not w.password_field) else -1
    return lab


@given(screens, window_lists)
@settings(max_examples=300, deadline=None)
def test_mask_matches_painting_and_partitions_the_screen(screen, spec) -> None:  # noqa: ANN001
    width, height = screen
    allowed = {"ok", "ok2"}
    ws = [win(a, g, i, password_field=pw and a == "ok2") for i, (a, g, pw) in enumerate(spec)]
    mask = compute_mask(width, height, ws, by_app(allowed))
    # disjoint, and filled ∪ visible = the whole screen
    count = np.zeros((height, width), np.int32)
    for r in [r for r, _, _ in mask.visible] + mask.filled:
        assert r[2] > 0 and r[3] > 0
        assert r[0] >= 0 and r[1] >= 0 and r[0] + r[2] <= width and r[1] + r[3] <= height
        count[r[1]:r[1] + r[3], r[0]:r[0] + r[2]] += 1
    assert (count == 1).all()
    # every unfilled pixel is exactly where the painting oracle shows an allowlisted window
    lab = oracle(width, height, ws, allowed)
    unfilled = np.zeros((height, width), bool)
    for r, app, url in mask.visible:
        part = lab[r[1]:r[1] + r[3], r[0]:r[0] + r[2]]
        owners = {ws[i].app_id for i in np.unique(part)} if (part >= 0).all() else {None}
        assert owners == {app} and app in allowed and url == f"https://{app}.example/"
        unfilled[r[1]:r[1] + r[3], r[0]:r[0] + r[2]] = True
    assert (unfilled == (lab >= 0)).all()

    # the pixels: everything outside the unfilled rectangles is the fill colour, inside untouched
    img = noise(width, height, seed=len(spec))
    cap = FrameCapturer(FrameConfig(format="png"), lambda: img.copy(), lambda: ws, by_app(allowed),
                        clock=lambda: T0)
    frame = cap.final_frame(T0)
    assert frame is not None
    px = np.asarray(Image.open(io.BytesIO(frame.image)).convert("RGB"))
    src = np.asarray(img)
    assert (px[~unfilled] == FILL_RGB).all()
    assert (px[unfilled] == src[unfilled]).all()
    assert frame.filled == mask.filled_meta() and frame.windows == mask.windows_meta()


def test_a_covered_allowlisted_window_shows_only_its_visible_part() -> None:
    ws = [win("ok", (0, 0, 100, 100), 1), win("no", (50, 0, 100, 100), 2)]
    mask = compute_mask(200, 100, ws, by_app({"ok"}))
    assert [r for r, _, _ in mask.visible] == [(0, 0, 50, 100)]
    assert mask.filled == [(50, 0, 150, 100)]


def test_unknown_window_list_fills_the_whole_frame() -> None:
    img = noise(40, 30, 1)
    cap = FrameCapturer(FrameConfig(format="png"), lambda: img.copy(), lambda: None, by_app({"ok"}),
                        clock=lambda: T0)
    frame = cap.final_frame(T0)
    assert frame is not None
    assert frame.windows == [] and frame.filled == [{"x": 0, "y": 0, "width": 40, "height": 30}]
    assert (np.asarray(Image.open(io.BytesIO(frame.image))) == FILL_RGB).all()
    assert cap.counters.fully_filled == 1


def test_a_not_allowlisted_window_without_geometry_fills_everything() -> None:
    ws = [win("ok", (0, 0, 40, 30), 1), win("no", None, 2)]
    assert compute_mask(40, 30, ws, by_app({"ok"})).filled == [(0, 0, 40, 30)]
    # an allowlisted one without geometry only un-fills nothing
    ws = [win("ok", (0, 0, 20, 30), 1), win("ok", None, 2)]
    assert compute_mask(40, 30, ws, by_app({"ok"})).filled == [(20, 0, 20, 30)]


def test_no_window_means_filled() -> None:
    assert compute_mask(40, 30, [], by_app({"ok"})).filled == [(0, 0, 40, 30)]


def test_password_field_window_is_filled_even_if_allowed() -> None:
    ws = [win("ok", (0, 0, 40, 30), 1, password_field=True)]
    assert compute_mask(40, 30, ws, by_app({"ok"})).visible == []


def test_stamp_focused_copies_url_only_to_the_focused_window() -> None:
    ws = [win("b", (0, 0, 10, 10), 1), win("b", (10, 0, 10, 10), 2)]
    focused = WindowInfo(app_id="b", title="t", url="https://a.example/x", window_id=2)
    out = stamp_focused(ws, focused)
    assert out is not None and [w.url for w in out] == [None, "https://a.example/x"]
    assert stamp_focused(None, focused) is None


def test_policy_decide_fills_url_apps_without_a_url() -> None:
    from handtrace.agent.localpolicy import LocalPolicy
    from handtrace.core.policy import Policy

    local = LocalPolicy(Policy(version=1, allowed_apps=frozenset({"firefox", "code"}),
                               allowed_domains=("example.com",)))
    decide = PolicyDecide(lambda: local)
    focused = WindowInfo(app_id="firefox", title=None, url="https://docs.example.com/a?q=1", window_id=2)
    other = WindowInfo(app_id="firefox", title=None, window_id=3)
    assert decide(other)[0]  # not yet known to carry URLs: judged by app, as passive capture does
    decide.observe(focused)
    assert decide(focused) == (True, "https://docs.example.com/a")
    assert decide(other) == (False, None)  # a browser window whose page cannot be checked
    assert decide(WindowInfo(app_id="code", title=None))[0]
    assert not decide(WindowInfo(app_id="firefox", title=None, url="https://evil.net/"))[0]
    assert not PolicyDecide(lambda: local, url_apps={"code"})(WindowInfo(app_id="code", title=None))[0]


def test_window_list_changing_during_the_grab_discards_it() -> None:
    lists = iter([[win("ok", (0, 0, 40, 30), 1)], [win("no", (0, 0, 40, 30), 2)]])
    cap = FrameCapturer(FrameConfig(), lambda: noise(40, 30, 0), lambda: next(lists), by_app({"ok"}),
                        clock=lambda: T0)
    cap.poll(T0)
    assert cap.counters.unstable == 1 and cap.frame_before(T0 + S) is None


# --------------------------------------------------------------------------- ring and selection


class Screen:
    """A fake screen whose content changes when told; a clock that advances per read."""

    def __init__(self) -> None:
        self.seed = 0
        self.t = T0
        self.grabs = 0

    def grab(self) -> Image.Image:
        self.grabs += 1
        return noise(64, 48, self.seed)

    def clock(self) -> int:
        return self.t


def capturer(screen: Screen, **cfg: object) -> FrameCapturer:
    return FrameCapturer(FrameConfig(**cfg), screen.grab, lambda: [win("ok", (0, 0, 64, 48), 1)],  # type: ignore[arg-type]
                         by_app({"ok"}), clock=screen.clock)


def test_not_distinct_grabs_are_discarded_before_encoding() -> None:
    screen = Screen()
    cap = capturer(screen, interval_s=1.0)
    for i in range(5):
        screen.t = T0 + i * S
        cap.poll(screen.t)
    assert cap.counters.grabs == 5 and cap.counters.kept == 1 and cap.counters.not_distinct == 4
    assert cap.counters.encoded == 0
    screen.seed = 7
    screen.t = T0 + 5 * S
    cap.poll(screen.t)
    assert cap.counters.kept == 2 and cap.counters.encoded == 0


def test_a_typed_character_is_a_distinct_frame_though_dhash_does_not_move() -> None:
    # A 1280x800 screen with content (a gradient), then the same with one 7x12 glyph drawn: the
    # 64-bit dHash does not change (its blind spot), the frame must still be kept, or the frame
    # before the next action would show the screen without what was just typed.
    row = bytes(x * 255 // 1280 for x in range(1280))
    blank = Image.frombytes("L", (1280, 800), row * 800).convert("RGB")
    typed = blank.copy()
    typed.paste((20, 20, 20), (400, 300, 407, 312))
    shots = iter([blank, typed])
    t = [T0]
    cap = FrameCapturer(FrameConfig(interval_s=1.0), lambda: next(shots).copy(),
                        lambda: [win("ok", (0, 0, 1280, 800), 1)], by_app({"ok"}), clock=lambda: t[0])
    cap.poll(T0)
    t[0] = T0 + S
    cap.poll(T0 + S)
    assert hamming(dhash(blank.reduce(8)), dhash(typed.reduce(8))) == 0  # the blind spot is real
    assert cap.counters.kept == 2
    coarse = FrameCapturer(FrameConfig(interval_s=1.0, hash_distance=1), iter([blank, typed]).__next__,
                           lambda: [win("ok", (0, 0, 1280, 800), 1)], by_app({"ok"}), clock=lambda: t[0])
    coarse.poll(T0)
    coarse.poll(T0 + S)
    assert coarse.counters.kept == 1  # the cheaper mode, documented as blind to it


def test_poll_grabs_only_when_due() -> None:
    screen = Screen()
    cap = capturer(screen, interval_s=1.0)
    cap.poll(T0)
    cap.poll(T0 + S // 2)
    cap.poll(T0 + S)
    assert screen.grabs == 2  # the poll half an interval later did not grab


def test_two_actions_sharing_a_frame_encode_it_once() -> None:
    screen = Screen()
    cap = capturer(screen)
    cap.poll(T0)
    a = cap.frame_before(T0 + 10)
    b = cap.frame_before(T0 + 20)
    assert a is b and cap.counters.encoded == 1


def test_ring_keeps_the_newest_distinct_frames() -> None:
    screen = Screen()
    cap = capturer(screen, ring=3)
    for i in range(6):
        screen.seed, screen.t = i, T0 + i * S
        cap.poll(screen.t)
    assert cap.frame_before(T0 + 2 * S + 1) is None  # frames 0..2 fell out of the ring
    f = cap.frame_before(T0 + 3 * S + 1)
    assert f is not None and f.captured_at_us == T0 + 3 * S


def test_a_frame_grabbed_at_t_is_not_the_frame_before_t() -> None:
    screen = Screen()
    cap = capturer(screen)
    cap.poll(T0)
    assert cap.frame_before(T0) is None
    assert cap.frame_before(T0 + 1) is not None


def test_reset_drops_the_ring() -> None:
    screen = Screen()
    cap = capturer(screen)
    cap.poll(T0)
    cap.reset()
    assert cap.frame_before(T0 + S) is None
    cap.poll(T0 + 1)  # due again at once after a reset, and kept even if unchanged
    assert cap.frame_before(T0 + S) is not None


@given(st.lists(st.tuples(st.integers(0, 3 * S), st.integers(0, 3)), min_size=1, max_size=25),
       st.lists(st.integers(0, 40 * S), min_size=1, max_size=10), st.integers(1, 8))
@settings(max_examples=150, deadline=None)
def test_frame_before_never_leaks_the_future(steps, queries, ring) -> None:  # noqa: ANN001
    """Whatever the grab times and contents: frame_before(t) is the newest kept frame grabbed
    strictly before t (a model of the ring computed independently)."""
    screen = Screen()
    cap = capturer(screen, ring=ring, interval_s=0.01)
    kept: list[tuple[int, int]] = []  # (captured_at_us, seed) of frames kept, in order
    t = T0
    for dt, seed in steps:
        t += dt + 10_000
        screen.t, screen.seed = t, seed
        cap.poll(t)
        if not kept or kept[-1][1] != seed:
            kept.append((t, seed))
    model = kept[-ring:]
    # arbitrary times, and exactly each grab time and just after it (strictly before: not itself)
    times = [T0 + q for q in queries] + [k[0] + d for k in kept for d in (0, 1)]
    for tq in times:
        f = cap.frame_before(tq)
        expect = [k for k in model if k[0] < tq]
        if not expect:
            assert f is None
        else:
            assert f is not None and f.captured_at_us < tq
            assert f.captured_at_us == expect[-1][0]
            px = np.asarray(Image.open(io.BytesIO(f.image)).convert("RGB"))
            assert (px == np.asarray(noise(64, 48, expect[-1][1]))).all()


# -------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_encoding_is_lossless_and_deterministic(fmt: str) -> None:
    img = noise(97, 61, 3)
    data = encode(img, fmt)
    back = Image.open(io.BytesIO(data))
    assert back.format == fmt.upper()
    assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(img))
    assert encode(img, fmt) == data


def test_frame_fields() -> None:
    import hashlib

    screen = Screen()
    cap = capturer(screen, format="webp")
    cap.poll(T0)
    f = cap.frame_before(T0 + 1)
    assert f is not None and f.fmt == "webp" and f.image[8:12] == b"WEBP"
    assert f.sha256 == hashlib.sha256(f.image).digest() and (f.width, f.height) == (64, 48)
    assert f.windows == [{"app_id": "ok", "url": "https://ok.example/", "x": 0, "y": 0, "width": 64, "height": 48}]
    assert f.filled == [] and f.scale == 1.0


def test_config_from_settings() -> None:
    d = DemoSettings(frame_interval_s=2.5, frame_ring=6, frame_hash_distance=3, frame_format="png")
    c = FrameConfig.from_settings(d)
    assert (c.interval_s, c.ring, c.hash_distance, c.format) == (2.5, 6, 3, "png")


def test_synthetic_source_lists_its_focused_window_as_visible() -> None:
    from handtrace.agent.sources.synthetic import SyntheticSource

    src = SyntheticSource(seed=3)
    assert src.visible_windows() == []
    src.drive(T0, T0 + 30 * S, lambda ev: None)
    focused = src.focused_window()
    assert focused is not None and src.visible_windows() == [focused]
    assert focused.geometry is not None and focused.geometry[:2] == (0, 0)
