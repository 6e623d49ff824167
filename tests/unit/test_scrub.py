"""Screenshot scrubbing (handtrace.export.scrub), without OCR: tesseract's TSV parsed strictly,
PII spans of the shared detectors mapped back to word boxes (hand-built OCR rows: a value in one
word, across words, split by OCR at spurious spaces, over two lines), coordinates scaled back and
clipped, and fail-closed behaviour (undecodable frame, OCR missing or failing, garbage output).
The OCR itself is tested on rendered frames in tests/integration/test_scrub_ocr.py."""

from __future__ import annotations

import io
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from handtrace.core import pii
from handtrace.export import scrub
from handtrace.export.scrub import OcrWord, UnscrubbableFrame, parse_tsv, pii_boxes

HEADER = "\t".join(scrub.TSV_HEADER)
CHAR_W = 8  # px per character of the hand-built rows
SPACE = 12  # a clear space (a monospace one is ~1.4 characters wide: scrub.GLUE_GAPS)
SPLIT = 3  # a spurious OCR split inside a token
H = 14


def line(*pieces: str | tuple[str, int], top: int = 100, left: int = 40, block: int = 1, par: int = 1,
         line_num: int = 1) -> list[OcrWord]:
    """OCR words laid out left to right: a string follows a real space, ``(text, gap)`` the given gap."""
    words: list[OcrWord] = []
    x = left
    for i, p in enumerate(pieces):
        text, gap = (p, SPACE) if isinstance(p, str) else p
        if i:
            x += gap
        words.append(OcrWord(x, top, CHAR_W * len(text), H, 90.0, text, block, par, line_num))
        x += CHAR_W * len(text)
    return words


def covered(word: OcrWord, boxes: list[dict[str, Any]]) -> bool:
    """Whether ``word``'s box lies inside one filled box (independent of the code's padding)."""
    return any(b["x"] <= word.left and b["y"] <= word.top and word.left + word.width <= b["x"] + b["width"]
               and word.top + word.height <= b["y"] + b["height"] for b in boxes)


def intersects(word: OcrWord, boxes: list[dict[str, Any]]) -> bool:
    return any(b["x"] < word.left + word.width and word.left < b["x"] + b["width"]
               and b["y"] < word.top + word.height and word.top < b["y"] + b["height"] for b in boxes)


# ------------------------------------------------------------------ TSV


def test_parse_tsv_keeps_word_rows_with_text() -> None:
    tsv = "\n".join([
        HEADER,
        "1\t1\t0\t0\t0\t0\t0\t0\t1920\t1080\t-1\t",
        "4\t1\t2\t1\t1\t0\t60\t83\t235\t14\t-1\t",
        "5\t1\t2\t1\t1\t1\t60\t83\t15\t11\t93.28\tTo:",
        "5\t1\t2\t1\t1\t2\t87\t83\t208\t14\t89.8\tada@example.com",
        "5\t1\t3\t1\t1\t1\t0\t0\t1920\t37\t95.0\t ",
    ]) + "\n"
    words = parse_tsv(tsv)
    assert [w.text for w in words] == ["To:", "ada@example.com"]
    assert words[1] == OcrWord(87, 83, 208, 14, 89.8, "ada@example.com", 2, 1, 1)


@pytest.mark.parametrize("tsv", [
    "", "Error: could not open image\n", HEADER.replace("text", "txt") + "\n",
    HEADER + "\n5\t1\t1\t1\t1\t1\t10\t10\t5\n",  # a truncated row
    HEADER + "\n5\t1\t1\t1\t1\t1\tx\t10\t5\t5\t90\tword\n",  # a non-number
])
def test_parse_tsv_refuses_anything_else(tsv: str) -> None:
    with pytest.raises(ValueError):
        parse_tsv(tsv)


# ------------------------------------------------------------------ spans → boxes


def test_email_in_one_word_is_filled_and_its_neighbours_are_not() -> None:
    words = line("To:", "ada.lovelace@example.com", "about", "lunch")
    boxes = pii_boxes(words)
    assert [b["kind"] for b in boxes] == ["email"]
    assert covered(words[1], boxes)
    assert not any(intersects(w, boxes) for w in (words[0], words[2], words[3]))


def test_values_spanning_several_words_fill_all_of_them() -> None:
    phone = line("Call", "me", "on", "+44", "20", "7946", "0958", "tomorrow")
    card = line("Card", "4111", "1111", "1111", "1111", "expires", "12/29", top=200, line_num=2)
    boxes = pii_boxes(phone + card)
    assert {b["kind"] for b in boxes} == {"phone", "card"}
    assert all(covered(w, boxes) for w in phone[3:7] + card[1:5])
    assert not any(intersects(w, boxes) for w in phone[:3] + phone[7:] + card[:1] + card[5:])


def test_one_box_per_line_covers_the_gaps_between_the_words() -> None:
    words = line("Card", "4111", "1111", "1111", "1111")
    (box,) = pii_boxes(words)
    assert box["x"] < words[1].left and box["x"] + box["width"] > words[4].left + words[4].width
    assert box["y"] < words[1].top and box["y"] + box["height"] > words[1].top + words[1].height


def test_a_token_ocr_split_at_spurious_spaces_is_filled_whole() -> None:
    # OCR of a 14 px monospace token: three words a third of a character apart; the detector
    # (gh[pousr]_ and 20+ characters) matches none of the pieces alone.
    token = ["ghp_A1b2C3d4E5", "f6G7h8I9j", "0K1l2M3n4O5p6Q7r8"]
    words = line("Authorization:", "Bearer", token[0], (token[1], SPLIT), (token[2], SPLIT), "'")
    assert not any(pii.find_spans(t) for t in token[:2])
    boxes = pii_boxes(words)
    assert {b["kind"] for b in boxes} == {"secret"}
    assert all(covered(w, boxes) for w in words[2:5])
    assert not intersects(words[0], boxes)


def test_a_secret_extends_over_a_piece_ocr_cut_off_with_a_wide_gap() -> None:
    # Real OCR of a 14 px monospace token (tests/integration): the first piece ends two
    # characters before the second begins; only "Bearer <piece>" is a secret on its own.
    words = line("curl", "Bearer", "ghp_Alb2C3d4E5f6G7h819j", ("0K112M3n405p6Q7r8", 2 * CHAR_W), "-v",
                 ("far", 6 * CHAR_W))
    assert not pii.find_spans("0K112M3n405p6Q7r8")
    boxes = pii_boxes(words)
    assert covered(words[2], boxes) and covered(words[3], boxes)
    assert not intersects(words[0], boxes) and not intersects(words[5], boxes)


def test_an_email_does_not_extend_over_its_neighbour() -> None:
    words = line("mail", "ada@example.com", ("today", 2 * CHAR_W))
    boxes = pii_boxes(words)
    assert covered(words[1], boxes) and not intersects(words[2], boxes)


def test_an_email_split_at_its_dot_is_filled_whole() -> None:
    words = line("echo", "ada.", ("lovelace@example.com", SPLIT + 4))
    boxes = pii_boxes(words)
    assert covered(words[1], boxes) and covered(words[2], boxes)
    assert not intersects(words[0], boxes)


def test_a_key_over_two_lines_of_one_paragraph_fills_both_lines() -> None:
    first = line("-----BEGIN", "PRIVATE", "KEY-----", top=100, line_num=1)
    body = line("MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", top=120, line_num=2)
    other = line("Meeting", "notes", top=300, block=2)
    boxes = pii_boxes(first + body + other)
    assert {b["kind"] for b in boxes} == {"secret"}
    assert all(covered(w, boxes) for w in first + body)
    assert not any(intersects(w, boxes) for w in other)


def test_a_tight_space_may_fill_a_neighbour_but_never_less() -> None:
    # Proportional fonts space words ~1 character apart: the loosest view reads the email's
    # top-level domain into the next word. Over-filling is the accepted side of the trade.
    tight = line("To:", ("ada@example.com", CHAR_W), ("about", CHAR_W))
    boxes = pii_boxes(tight)
    assert covered(tight[1], boxes) and not intersects(tight[0], boxes)


def test_ordinary_text_fills_nothing() -> None:
    words = (line("Meeting", "notes", "for", "the", "quarterly", "review")
             + line("File", "Edit", "View", "Help", top=20, block=2)
             + line("Total:", "1,204", "items", "in", "12", "folders", top=300, block=3))
    assert pii_boxes(words) == []


def test_boxes_are_scaled_back_to_the_frame_and_clipped() -> None:
    words = line("ada@example.com", left=0, top=0)  # OCR'd at 2x, touching the corner
    (box,) = pii_boxes(words, scale=2, size=(50, 5))
    assert (box["x"], box["y"]) == (0, 0)
    assert box["width"] <= 50 and box["height"] <= 5
    (unclipped,) = pii_boxes(words, scale=2)
    assert unclipped["width"] * 2 >= words[0].width and unclipped["height"] * 2 >= words[0].height


@settings(max_examples=150, deadline=None)
@given(
    value=st.sampled_from([
        "ada.lovelace@example.com", "4539 1488 0343 6467", "+44 20 7946 0958", "(415) 555-0132",
        "AKIAIOSFODNN7EXAMPLE", "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
        "sk-proj-Ab3dEf9hIjK2mNoP4qRsT7uVwXyZ", "xoxb-123456789012-abcdefABCDEF",
    ]),
    before=st.lists(st.sampled_from(["Please", "see", "the", "note", "from", "Ada"]), max_size=4),
    after=st.lists(st.sampled_from(["today", "and", "review", "it", "then"]), max_size=4),
    cuts=st.sets(st.integers(1, 40), max_size=3),
)
def test_every_word_of_a_detected_value_is_filled_however_ocr_splits_it(
        value: str, before: list[str], after: list[str], cuts: set[int]) -> None:
    # The value's own words, further cut by OCR at spurious places (a gap a third of a character).
    pieces: list[str | tuple[str, int]] = list(before)
    for k, part in enumerate(value.split(" ")):
        inner = sorted(c for c in cuts if c < len(part))
        for j, (s, e) in enumerate(zip([0, *inner], [*inner, len(part)], strict=True)):
            text = part[s:e]
            pieces.append(text if (j == 0 and (k or before)) else (text, SPLIT) if j else text)
    value_at = len(before)
    pieces += after
    words = line(*pieces)
    boxes = pii_boxes(words)
    value_words = words[value_at:len(words) - len(after)]
    assert all(covered(w, boxes) for w in value_words), (value, [w.text for w in words], boxes)


# ------------------------------------------------------------------ fails closed


def png(size: tuple[int, int] = (64, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (255, 255, 255)).save(buf, "PNG")
    return buf.getvalue()


def test_an_undecodable_frame_is_unscrubbable() -> None:
    with pytest.raises(UnscrubbableFrame, match="cannot be decoded"):
        scrub.scrub_frame(b"\x89PNG\r\n\x1a\n not really")


def test_missing_ocr_makes_the_frame_unscrubbable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scrub, "TESSERACT", "handtrace-no-such-ocr")
    with pytest.raises(UnscrubbableFrame, match="not found"):
        scrub.scrub_frame(png())


@pytest.mark.parametrize("error", [UnscrubbableFrame("OCR exited with 1"), UnscrubbableFrame("timed out")])
def test_ocr_failure_yields_an_outcome_without_an_image(monkeypatch: pytest.MonkeyPatch,
                                                         error: Exception) -> None:
    def fail(*_a: object, **_k: object) -> list[OcrWord]:
        raise error

    monkeypatch.setattr(scrub, "ocr_words", fail)
    monkeypatch.setattr(scrub, "tesseract_version", lambda: "tesseract 5.3.0")
    out = scrub._scrub_one(7, png(), 2, 5.0, 1)
    assert (out.index, out.ok, out.image, out.filled) == (7, False, None, [])
    assert out.error is not None and str(error) in out.error


def test_a_frame_with_nothing_found_is_returned_byte_for_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scrub, "ocr_words", lambda *_a, **_k: line("Meeting", "notes"))
    data = png()
    assert scrub.scrub_frame(data) == (data, [], pii.DETECTOR_VERSION)


def test_found_boxes_are_filled_solid(monkeypatch: pytest.MonkeyPatch) -> None:
    # OCR at 2x reports the email at (20..140, 20..34) of the upscaled image: (10..70, 10..17).
    monkeypatch.setattr(scrub, "ocr_words", lambda *_a, **_k: line("ada@example.com", left=20, top=20))
    image, filled, version = scrub.scrub_frame(png((200, 60)))
    assert version == pii.DETECTOR_VERSION and [b["kind"] for b in filled] == ["email"]
    out = Image.open(io.BytesIO(image))
    assert out.format == "PNG" and out.size == (200, 60)
    b = filled[0]
    assert b["x"] <= 10 and b["y"] <= 10 and b["x"] + b["width"] >= 70 and b["y"] + b["height"] >= 17
    inside = out.crop((b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]))
    assert inside.getcolors() == [(b["width"] * b["height"], scrub.FILL_RGB)]
    assert out.getpixel((199, 59)) == (255, 255, 255)
