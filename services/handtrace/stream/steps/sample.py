"""Sampling and pointer decimation: ops-tunable volume control that drops whole rows, decided
deterministically so a replay of the same events stores exactly the same rows.

SampleStep -- ``Policy.sampling`` maps a selector to a rate in [0, 1]:

* ``app:<app_id>``   rows whose ``app_id`` is exactly <app_id>
* ``kind:<kind>``    rows of that event kind (``kind:pointer_move``)
* ``cohort:<name>``  rows whose ``cohort`` column is <name>; ignored when the frame has no
                     ``cohort`` column
* ``*``              every row (the default)

Precedence (one rule): the most specific level that matches a row decides its rate,
``app:`` > ``kind:`` > ``cohort:`` > ``*``; a row matching nothing keeps rate 1.0. A row has one
app, one kind and one cohort, so at most one selector per level matches and there are no ties.
Content selectors (what the event is) beat the population selector (whose it is), and ``*`` is
only a default, so ``{"*": 0.1, "app:code": 1.0}`` stores all of code and 10% of the rest.
Matching is exact and case-sensitive. ``app:`` sees ``app_id`` as the rows carry it: run this
step after the allowlist step (which fills ``app_id`` within each batch), otherwise only rows
stamped by the agent (always the focus changes) match an app selector. Selectors with another
prefix are ignored (forward compatible); :func:`sampling_problems` lists them so the control
plane can reject a policy. The rule is one function, :meth:`_Rules.decide`, applied per distinct
(app, kind, cohort) of a frame; :func:`rate_for` / :func:`deciding_selector` expose it to the
control plane's dry run (control/api/dryrun.py), so the estimate cannot drift from the step.

Invalid rates fail closed: a value that is not a real number in [0, 1] (NaN, negative, > 1,
bool, string, None) makes its selector a rate of 0, and the rows it decides are dropped as
``invalid_sampling_rate`` rather than ``sampled_out``, so the misconfiguration shows in the
drop metrics instead of poisoning every message into the dead-letter topic.

The sampling unit is an episode: (employee, device, ``floor(captured_at / episode_s)``) with
windows aligned to the Unix epoch. Each episode draws ``u = HMAC-SHA256(key, episode)[:8] / 2**64``
(one HMAC per distinct episode in the frame, mapped back by a join) and a row is kept iff
``u < rate(row)``. The decision depends only on the row, its episode, the key and the policy:
not on batch boundaries, micro-batch grouping or arrival order. Consequences:

* rows of an episode that share a rate are all kept or all dropped (trajectories stay whole);
* with several rates in one episode the kept rows are nested: if a row with rate r is kept,
  every row of that episode with a rate >= r is kept too (``kind:pointer_move: 0.1`` stores the
  whole pointer trajectory of 10% of the episodes and every other event of all of them);
* rate 0 stores nothing and rate 1 stores everything, exactly;
* rows with a null capture time belong to no episode and are dropped unless their rate is 1.

Identity columns: the raw ``employee_id``/``device_id`` when present, else the pseudonymised
``employee_key``/``device_key`` -- placing the step after pseudonymisation is allowed but then
decisions also change on a pseudonym key rotation. Decisions change with the sampling key
(by design) and with the policy.

PointerDecimateStep -- keeps at most one ``pointer_move`` per (employee, device, batch) per time
bin of ``1/max_hz`` seconds, bins aligned to the epoch (``max_hz`` integer: each calendar second
holds exactly ``max_hz`` bins). The first move of a bin by (captured_at, event_id) is kept. Other
kinds are untouched. Bins are counted per batch, the atomic unit of the stream (a re-send has the
same id and events), so the result never depends on how batches are grouped into frames; the
price is that a bin straddling the boundary of two consecutive batches of a device may keep one
move from each, i.e. a second holding a batch boundary can keep ``max_hz + 1`` moves.
"""

from __future__ import annotations

import hmac
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import polars as pl

from handtrace.stream.steps import BatchContext, StepResult

SAMPLED_OUT = "sampled_out"
INVALID_RATE = "invalid_sampling_rate"
DECIMATED = "decimated"

_LEVELS = ("app", "kind", "cohort")  # most specific first
_LEVEL_COLUMN = {"app": "app_id", "kind": "kind", "cohort": "cohort"}
_INVALID = -1.0  # sentinel rate of a selector whose configured value is invalid
_HASH_DOMAIN = b"handtrace.sample.episode.v1\x00"
_US = 1_000_000
_U32, _I64 = struct.Struct(">I"), struct.Struct(">q")


def _valid_rate(value: Any) -> float | None:
    """The rate as a float, or None when it is not a real number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    rate = float(value)
    return rate if 0.0 <= rate <= 1.0 else None  # NaN fails both comparisons


def sampling_problems(sampling: Mapping[str, Any]) -> list[str]:
    """What is wrong with a sampling policy: invalid rates and unknown selectors (both of which
    the step tolerates: the first fail closed, the second are ignored)."""
    problems = []
    for selector, value in sampling.items():
        prefix, sep, rest = selector.partition(":")
        if selector != "*" and (not sep or prefix not in _LEVELS or not rest):
            problems.append(f"unknown selector {selector!r} (ignored)")
        if _valid_rate(value) is None:
            problems.append(f"invalid rate {value!r} for {selector!r} (treated as 0)")
    return problems


def deciding_selector(sampling: Mapping[str, Any], app_id: str | None, kind: str | None,
                      cohort: str | None = None) -> tuple[str | None, float]:
    """The selector of ``sampling`` that decides a row with this app, kind and cohort (None: none
    matches, the row is kept) and the rate it keeps, by the step's own precedence rule
    (``app:`` > ``kind:`` > ``cohort:`` > ``*``); an invalid rate counts as 0 (the step drops those
    rows). ``None`` for a value means the row has none: no selector of that level matches it."""
    selector, rate = _Rules.of(sampling, set(_LEVEL_COLUMN.values())).decide(app_id, kind, cohort)
    return selector, max(rate, 0.0)


def rate_for(sampling: Mapping[str, Any], app_id: str | None, kind: str | None, cohort: str | None = None) -> float:
    """The share of episodes whose rows of this app, kind and cohort the step keeps (see
    :func:`deciding_selector`)."""
    return deciding_selector(sampling, app_id, kind, cohort)[1]


@dataclass(frozen=True)
class _Rules:
    levels: dict[str, dict[str, float]]  # level -> value -> rate (_INVALID when invalid)
    default: float | None

    @classmethod
    def of(cls, sampling: Mapping[str, Any], columns: set[str]) -> _Rules:
        levels: dict[str, dict[str, float]] = {lvl: {} for lvl in _LEVELS}
        default: float | None = None
        for selector, value in sampling.items():
            rate = _valid_rate(value)
            rate = _INVALID if rate is None else rate
            if selector == "*":
                default = rate
                continue
            prefix, sep, rest = selector.partition(":")
            if sep and rest and prefix in levels and _LEVEL_COLUMN[prefix] in columns:
                levels[prefix][rest] = rate
        return cls({k: v for k, v in levels.items() if v}, default)

    def decide(self, app_id: str | None, kind: str | None, cohort: str | None) -> tuple[str | None, float]:
        """The precedence rule, for one row's app, kind and cohort (None: the row has none, or the
        frame lacks the column): the selector that decides it as written in the policy, or None
        when none matches, and its rate (1.0 for none, ``_INVALID`` for an invalid value). The
        step applies this per distinct (app, kind, cohort) of a frame; the dry run of the control
        plane per stored (app, kind) group (:func:`deciding_selector`)."""
        values = {"app": app_id, "kind": kind, "cohort": cohort}
        for lvl, rates in self.levels.items():  # dict keeps _LEVELS order: most specific first
            value = values[lvl]
            if value is not None and value in rates:
                return f"{lvl}:{value}", rates[value]
        return ("*", self.default) if self.default is not None else (None, 1.0)

    def decide_frame(self, frame: pl.DataFrame) -> pl.DataFrame:
        """``_selector`` and ``_rate`` of every row of ``frame`` (same order), by :meth:`decide`
        over the distinct (app, kind, cohort) of the frame joined back: bounded Python, no per-row."""
        cols = [c for c in _LEVEL_COLUMN.values() if c in frame.columns]
        if not cols:
            selector, rate = self.decide(None, None, None)
            return pl.DataFrame({"_selector": pl.repeat(selector, frame.height, dtype=pl.String, eager=True),
                                 "_rate": pl.repeat(rate, frame.height, dtype=pl.Float64, eager=True)})
        values = frame.select(pl.col(c).cast(pl.String) for c in cols)
        combos = values.unique()
        decided = [self.decide(*(row.get(c) for c in _LEVEL_COLUMN.values()))
                   for row in combos.iter_rows(named=True)]
        combos = combos.with_columns(
            pl.Series("_selector", [d[0] for d in decided], dtype=pl.String),
            pl.Series("_rate", [d[1] for d in decided], dtype=pl.Float64),
        )
        return values.join(combos, on=cols, how="left", nulls_equal=True, maintain_order="left").select(
            "_selector", "_rate")

    @property
    def trivial(self) -> bool:
        return not self.levels and (self.default is None or self.default == 1.0)


def _id_columns(frame: pl.DataFrame) -> tuple[str, str]:
    if {"employee_id", "device_id"} <= set(frame.columns):
        return "employee_id", "device_id"
    if {"employee_key", "device_key"} <= set(frame.columns):
        return "employee_key", "device_key"
    raise ValueError("frame has neither employee_id/device_id nor employee_key/device_key")


def _check_key(key: Any) -> None:
    if not isinstance(key, bytes) or len(key) < 16:
        raise ValueError("sampling key must be bytes, at least 16 of them")


@dataclass(frozen=True)
class SampleStep:
    """Drops rows of episodes not drawn by the policy's sampling rates. Config: the secret key of
    the episode hash (at least 16 bytes) and the episode length in seconds."""

    key: bytes = field(repr=False)
    episode_s: int = 600
    name: str = "sample"

    def __post_init__(self) -> None:
        _check_key(self.key)
        if isinstance(self.episode_s, bool) or not isinstance(self.episode_s, int) or self.episode_s <= 0:
            raise ValueError("episode_s must be a positive integer number of seconds")

    def episode_draw(self, employee: str, device: str, window: int) -> float:
        """u in [0, 1) of one episode: the first 64 bits of HMAC-SHA256 over an unambiguous
        encoding of the episode, scaled by 2**-64 (to the 53 bits a float holds exactly)."""
        e, d = employee.encode(), device.encode()
        msg = b"".join((_HASH_DOMAIN, _U32.pack(len(e)), e, _U32.pack(len(d)), d, _I64.pack(window)))
        h = int.from_bytes(hmac.digest(self.key, msg, "sha256")[:8], "big")
        return (h >> 11) * 2.0**-53

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult:
        rules = _Rules.of(ctx.policy.sampling, set(frame.columns))
        if rules.trivial or frame.height == 0:
            return StepResult(frame)
        emp, dev = _id_columns(frame)
        window = pl.col("captured_at_us").dt.epoch("us") // (self.episode_s * _US)
        t = pl.concat([frame.select(pl.col(emp), pl.col(dev), window.alias("_ep")), rules.decide_frame(frame)],
                      how="horizontal")
        rate = pl.col("_rate")
        if t.get_column("_rate").min() >= 1.0:  # type: ignore[operator]
            kept_all = pl.repeat(False, t.height, eager=True)
            return StepResult(frame, sampling=_decided(t.get_column("_selector"), kept_all))
        keys = [emp, dev, "_ep"]
        drawn = t.filter((rate > 0.0) & (rate < 1.0) & pl.col("_ep").is_not_null()).select(keys).unique()
        if drawn.height:
            draws = [self.episode_draw(e, d, w) for e, d, w in drawn.iter_rows()]
            drawn = drawn.with_columns(pl.Series("_u", draws, dtype=pl.Float64))
            t = t.join(drawn, on=keys, how="left", maintain_order="left")
        else:
            t = t.with_columns(pl.lit(None, dtype=pl.Float64).alias("_u"))
        reason = (
            pl.when(rate >= 1.0).then(pl.lit(None, dtype=pl.String))
            .when(rate == _INVALID).then(pl.lit(INVALID_RATE))
            .when(pl.col("_u") < rate).then(pl.lit(None, dtype=pl.String))
            .otherwise(pl.lit(SAMPLED_OUT))
        )
        rejected = t.select(reason.alias("_why")).get_column("_why")
        drop = rejected.is_not_null()
        decided = _decided(t.get_column("_selector"), drop)
        if not drop.any():
            return StepResult(frame, sampling=decided)
        counts = {str(k): int(v) for k, v in rejected.drop_nulls().value_counts().iter_rows()}
        return StepResult(frame.filter(~drop), counts, sampling=decided)


def _decided(selector: pl.Series, drop: pl.Series) -> dict[tuple[str, str], int]:
    """Rows per (deciding selector, kept|dropped); rows no selector decides are not counted."""
    df = pl.DataFrame({"s": selector, "d": drop}).drop_nulls("s").group_by("s", "d").len()
    return {(s, "dropped" if d else "kept"): int(n) for s, d, n in df.iter_rows()}


def _bin_fraction(max_hz: float | int) -> Fraction:
    """``max_hz`` as a fraction p/q with q <= 1000, never above the value as written in decimal
    (``repr``: 29.97 is 2997/100, not the binary float just below it)."""
    exact = Fraction(repr(max_hz))
    f = exact.limit_denominator(1000)
    return f if f <= exact else Fraction(math.floor(exact * 1000), 1000)


@dataclass(frozen=True)
class PointerDecimateStep:
    """Keeps the first pointer_move of each 1/max_hz-second bin per (employee, device, batch).
    Config: the highest pointer sampling rate kept, in Hz (0.001 to 10000)."""

    max_hz: float = 30.0
    name: str = "decimate"

    def __post_init__(self) -> None:
        hz = self.max_hz
        if isinstance(hz, bool) or not isinstance(hz, int | float) or not 0.001 <= hz <= 10_000:
            raise ValueError("max_hz must be a number between 0.001 and 10000")

    def bin_expr(self) -> pl.Expr:
        """Index of the epoch-aligned bin of each row, in exact integer arithmetic: p bins per
        q seconds, split so no intermediate product overflows Int64."""
        f = _bin_fraction(self.max_hz)
        p, period = f.numerator, f.denominator * _US
        t = pl.col("captured_at_us").dt.epoch("us")
        return (t // period) * p + ((t % period) * p) // period

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult:
        emp, dev = _id_columns(frame)
        keys = [emp, dev, "batch_id", "_bin"]
        moves = (
            frame.select(
                pl.int_range(pl.len(), dtype=pl.UInt32).alias("_i"),
                pl.col("kind"), pl.col(emp), pl.col(dev), pl.col("batch_id"),
                self.bin_expr().alias("_bin"), pl.col("captured_at_us"), pl.col("event_id"),
            )
            .filter(pl.col("kind") == "pointer_move")
        )
        if moves.height == 0:
            return StepResult(frame)
        first = moves.group_by(keys).agg(pl.col("_i").sort_by(["captured_at_us", "event_id"]).first())
        n_drop = moves.height - first.height
        if n_drop == 0:
            return StepResult(frame)
        drop = np.zeros(frame.height, dtype=np.bool_)
        drop[moves.get_column("_i").to_numpy()] = True
        drop[first.get_column("_i").to_numpy()] = False
        return StepResult(frame.filter(pl.Series(~drop)), {DECIMATED: n_drop})
