"""Screenshot scrubbing with the real OCR (Debian's tesseract-ocr): a 1920x1080 frame rendered
with real TrueType fonts (DejaVu, as on a Linux desktop: a mail window in Sans 15 px, a dark
terminal in Sans Mono 14 px, a dark title bar) showing an email, a card number (valid Luhn),
phone numbers and API keys/tokens next to ordinary text. After scrubbing: every value's inked
pixels are filled solid, OCR of the output finds none of them and the detectors find nothing in
it, and the ordinary text is untouched and still read. Also the process pool: order, progress,
an undecodable frame reported unscrubbable with no image (fails closed).

No skip: without tesseract these tests fail, saying how to install it (deploy/setup.sh does)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw, ImageFont

from handtrace.core import pii
from handtrace.export import scrub

FONTS = Path("/usr/share/fonts/truetype/dejavu")
SANS, MONO = FONTS / "DejaVuSans.ttf", FONTS / "DejaVuSansMono.ttf"
SIZE = (1920, 1080)

# (x, y, prefix, value, suffix, font, size, ink, background); value None: ordinary text.
Line = tuple[int, int, str, str | None, str, Path, int, tuple[int, int, int]]
LINES: list[Line] = [
    (12, 8, "Inbox - Mail   File   Edit   View   Help", None, "", SANS, 15, (230, 230, 230)),
    (60, 80, "To: ", "ada.lovelace@example.com", "", SANS, 15, (20, 20, 20)),
    (60, 120, "Card number ", "4539 1488 0343 6467", "  expires 12/29", SANS, 15, (20, 20, 20)),
    (60, 160, "Call me on ", "+44 20 7946 0958", " tomorrow", SANS, 15, (20, 20, 20)),
    (60, 200, "or the office: ", "(415) 555-0132", "", SANS, 15, (20, 20, 20)),
    (60, 260, "Meeting notes for the quarterly review", None, "", SANS, 15, (20, 20, 20)),
    (60, 300, "Revenue grew in every region this year", None, "", SANS, 15, (20, 20, 20)),
    (1000, 560, "$ export OPENAI_API_KEY=", "sk-proj-Ab3dEf9hIjK2mNoP4qRsT7uVwXyZ", "", MONO, 14,
     (220, 220, 220)),
    (1000, 600, "$ curl -H 'Authorization: Bearer ", "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8", "'",
     MONO, 14, (220, 220, 220)),
    (1000, 640, "aws_access_key_id = ", "AKIAIOSFODNN7EXAMPLE", "", MONO, 14, (220, 220, 220)),
    (1000, 680, "$ git status", None, "", MONO, 14, (220, 220, 220)),
]
PLAIN_WORDS = ("Inbox", "Help", "Meeting", "quarterly", "review", "Revenue", "region", "status")


@pytest.fixture(scope="module")
def tesseract() -> str:
    """The OCR version; fails (never skips) when it is missing."""
    try:
        return scrub.tesseract_version()
    except scrub.UnscrubbableFrame as e:
        pytest.fail(f"{e}: the scrubbing tests need tesseract (deploy/setup.sh installs tesseract-ocr)")


def render() -> tuple[bytes, list[tuple[str, tuple[int, int, int, int]]], list[tuple[int, int, int, int]]]:
    """The frame (PNG), each value with its ink box, and the ink boxes of the ordinary text."""
    for f in (SANS, MONO):
        assert f.is_file(), f"{f} missing: install Debian's fonts-dejavu-core (deploy/setup.sh does)"
    img = Image.new("RGB", SIZE, (250, 250, 250))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, SIZE[0], 32), fill=(40, 44, 52))  # a dark title bar
    d.rectangle((980, 540, 1900, 720), fill=(30, 30, 30))  # a dark terminal
    values, plain = [], []
    for x, y, prefix, value, suffix, font_path, size, ink in LINES:
        font = ImageFont.truetype(str(font_path), size)
        d.text((x, y), prefix + (value or "") + suffix, font=font, fill=ink)
        if value is None:
            plain.append(d.textbbox((x, y), prefix, font=font))
            continue
        vx = x + d.textlength(prefix, font=font)
        values.append((value, d.textbbox((vx, y), value, font=font)))
        word = suffix.lstrip()
        if any(c.isalnum() for c in word):  # its ink: after its leading spaces (a quote is no word)
            sx = vx + d.textlength(value + suffix[: len(suffix) - len(word)], font=font)
            plain.append(d.textbbox((sx, y), word, font=font))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue(), values, plain


def ocr(image: bytes, upscale: int) -> list[scrub.OcrWord]:
    gray = Image.open(io.BytesIO(image)).convert("L")
    if upscale != 1:
        gray = gray.resize((gray.width * upscale, gray.height * upscale), Image.Resampling.BICUBIC)
    return scrub.ocr_words(gray)


def compact(s: str) -> str:
    return re.sub(r"[^0-9a-z]", "", s.lower())


def overlaps(a: tuple[int, int, int, int], b: dict[str, Any]) -> bool:
    return a[0] < b["x"] + b["width"] and b["x"] < a[2] and a[1] < b["y"] + b["height"] and b["y"] < a[3]


@pytest.fixture(scope="module")
def scrubbed(tesseract: str) -> tuple[bytes, scrub.ScrubbedFrame, Any, Any]:
    frame, values, plain = render()
    return frame, scrub.scrub_frame(frame), values, plain


def test_the_unscrubbed_frame_shows_the_values_to_ocr(scrubbed: Any) -> None:
    # The test would prove nothing if OCR could not read them in the first place.
    frame, _, values, _ = scrubbed
    seen = compact(" ".join(w.text for w in ocr(frame, 2)))
    assert sum(compact(v)[:10] in seen for v, _ in values) >= len(values) - 1


def test_every_value_is_filled_solid(scrubbed: Any) -> None:
    _, (image, filled, version), values, _ = scrubbed
    assert version == pii.DETECTOR_VERSION
    assert {b["kind"] for b in filled} >= {"email", "card", "phone", "secret"}
    out = Image.open(io.BytesIO(image)).convert("RGB")
    for value, box in values:
        colours = out.crop(box).getcolors(maxcolors=1 << 16)
        assert colours is not None and {c for _, c in colours} == {scrub.FILL_RGB}, (value, box, filled)


@pytest.mark.parametrize("upscale", [1, 2])
def test_ocr_of_the_scrubbed_frame_finds_no_value_and_no_pii(scrubbed: Any, upscale: int) -> None:
    _, (image, _, _), values, _ = scrubbed
    words = ocr(image, upscale)
    text = " ".join(w.text for w in words)
    assert scrub.pii_boxes(words) == [], text
    seen = compact(text)
    for value, _ in values:
        v = compact(value)
        leaked = [v[i:i + 6] for i in range(len(v) - 5) if v[i:i + 6] in seen]
        assert not leaked, (value, leaked, text)


def test_ordinary_text_is_not_filled_and_still_read(scrubbed: Any) -> None:
    _, (image, filled, _), _, plain = scrubbed
    for box in plain:
        assert not any(overlaps(box, b) for b in filled), (box, filled)
    seen = " ".join(w.text for w in ocr(image, 2))
    for word in PLAIN_WORDS:
        assert word in seen, (word, seen)


def test_many_frames_in_processes_in_order_failing_closed(scrubbed: Any, tmp_path: Path, tesseract: str) -> None:
    frame, (image, filled, _), _, _ = scrubbed
    on_disk = tmp_path / "frame.png"
    on_disk.write_bytes(frame)
    webp = io.BytesIO()
    Image.open(io.BytesIO(frame)).save(webp, "WEBP", lossless=True)
    calls: list[tuple[int, int | None]] = []
    outs = list(scrub.scrub_many([frame, b"not an image", on_disk, webp.getvalue()], workers=2,
                                 progress=lambda done, total: calls.append((done, total))))
    assert [o.index for o in outs] == [0, 1, 2, 3]
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    bad = outs[1]
    assert (bad.ok, bad.image, bad.filled) == (False, None, []) and "cannot be decoded" in (bad.error or "")
    for o in (outs[0], outs[2], outs[3]):
        assert o.ok and o.image is not None and o.error is None
        assert o.tesseract_version == tesseract and o.detector_version == pii.DETECTOR_VERSION
        assert o.scrub_version == scrub.SCRUB_VERSION
        assert 0 < o.cpu_seconds and 0 < o.seconds
        assert [b["kind"] for b in o.filled] == [b["kind"] for b in filled]
    assert outs[0].image == image and outs[2].source == str(on_disk)
    assert Image.open(io.BytesIO(outs[3].image or b"")).format == "WEBP"
