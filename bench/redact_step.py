"""RedactStep cost, CPU time best of 5, on a realistic frame (200k rows, typed text, few titles
and urls) and on a frame of 2,000 distinct titles and urls (the per-batch bound of
``max_distinct_values_per_batch``): ``PYTHONPATH=services:. python bench/redact_step.py``.
Compare detector versions by running it against two checkouts."""

import random
import time
from typing import Any

import polars as pl
from tests.unit.test_step_allowlist import T0, event, make_frame

from handtrace.stream.policy import Policy
from handtrace.stream.steps import BatchContext
from handtrace.stream.steps.redact import RedactStep

random.seed(1)
TITLES = [f"{w} - Visual Studio Code" for w in ("main.py", "README.md", "pii.py", "app.py")] + [
    "Inbox (3) - ada@acme.com - Mail", "Jira: HT-123 Fix login", "Pull request #42 · acme/handtrace",
    "Grafana – Stream", "München café naïve – Notes", "Slack | #general | acme", "Zoom Meeting",
    "Rechnung № 2024‑0815 – Bezahlung", "Google Docs – Q3 roadmap", "Terminal — bash — 80×24",
] * 3
URLS = [f"https://github.com/acme/handtrace/pull/{i}" for i in range(20)] + [
    "https://docs.google.com/document/d/1BxiMVs0XRA5nFMdKvBdBZjgmUUqptlbs74OgvE2upms/edit",
    "https://mail.example.com/u/ada%40acme.com/inbox", "https://jira.acme.com/browse/HT-123"]


def realistic(n_batches: int = 200, per: int = 1000) -> pl.DataFrame:
    batches: list[list[dict[str, Any]]] = []
    for _ in range(n_batches):
        rows: list[dict[str, Any]] = []
        while len(rows) < per:
            rows.append(event("focus_change", app_id="code", window_title=random.choice(TITLES),  # noqa: S311
                              url=random.choice(URLS)))  # noqa: S311
            for _move in range(40):
                rows.append(event("pointer_move", x=1, y=2))
            for ch in "hello world 42 ":
                rows.append(event("key_down", key_code=ord(ch), text=ch))
                rows.append(event("key_up", key_code=ord(ch)))
        batches.append(rows[:per])
    return make_frame(batches)

def distinct(n_batches: int = 100, per: int = 2000, n_distinct: int = 2000) -> pl.DataFrame:
    batches: list[list[dict[str, Any]]] = []
    k = 0
    for _ in range(n_batches):
        rows: list[dict[str, Any]] = []
        for i in range(per):
            if i % (per // (n_distinct // n_batches)) == 0:
                k += 1
                rows.append(event("focus_change", app_id="code",
                                  window_title=f"Doc {k} – notes · v{k}.{k % 7} ticket HT-{k}",
                                  url=f"https://example.com/d/{k:08x}/edit?tab=t.{k}"))
            else:
                rows.append(event("pointer_move", x=i, y=i))
        batches.append(rows)
    return make_frame(batches)

def best(step: RedactStep, frame: pl.DataFrame, policy: Policy) -> float:
    ctx = BatchContext(received_at_us=T0, policy=policy)
    ts = []
    for _ in range(5):
        t = time.process_time()
        step(frame, ctx)
        ts.append(time.process_time() - t)
    return min(ts)

def main() -> None:
    policy = Policy(allowed_apps=frozenset({"code"}), text_capture={"*": "full"})
    for name, f in (("realistic", realistic()), ("distinct", distinct())):
        titles, urls = f.get_column("window_title").n_unique(), f.get_column("url").n_unique()
        typed = f.get_column("text").drop_nulls().len()
        t = best(RedactStep(), f, policy)
        print(f"{name}: {f.height} rows, {typed} typed chars, {titles} titles, {urls} urls: "
              f"{t * 1000:.1f} ms, {f.height / t / 1e6:.2f} M rows/s")


if __name__ == "__main__":
    main()
