"""Allowlist: only events of allowlisted apps, and of allowlisted web domains, are kept.

Contract with the agents: every event carries the ``app_id`` of the focused app (and the ``url``
of the focused tab when the app is a browser); a ``focus_change`` always does. Older agents
stamp them on focus changes only, so within each batch (``batch_id``) a row without ``app_id``
inherits the app context -- ``app_id`` together with ``url`` -- of the latest earlier row of
the same batch that has an ``app_id``. The pair is filled together: a row never inherits the url
of an app that is no longer focused (a code editor row after a browser row gets no url). A
row's own ``url`` always wins over an inherited one. The filled columns are what is stored.

Rules, the first failing one naming the reason a row is dropped:

- ``no_app_context``: still no ``app_id`` after filling (the batch started without one) -- we
  cannot tell whose activity it is, so it goes (fail closed);
- ``not_allowlisted_app``: ``app_id`` not in ``policy.allowed_apps`` (an empty allowlist allows
  nothing);
- ``invalid_url``: the row has a url whose host cannot be determined safely: not absolute
  (``scheme://host...``), unparsable, no host, control characters or backslashes (browsers and
  Python disagree about those, the classic allowlist bypass), percent-encoded, IDNA-invalid under
  UTS-46/IDNA 2008 (``goo\u200dgle.com``), or number-like hosts that are not a dotted-quad IPv4
  (``127.1``);
- ``not_allowlisted_domain``: the host, as a browser connects to it (UTS-46/IDNA 2008
  non-transitional A-label, lowercase, userinfo and port removed, one trailing dot removed), is
  neither equal to an allowed domain ``d`` nor ends with ``"." + d``, or ``d`` lies outside the
  host's own site by the Public Suffix List. So ``docs.google.com`` passes ``google.com``;
  ``docs.google.com.evil.net``, ``evilgoogle.com`` and ``faß.de`` (not ``fass.de``: browsers keep
  the ß) do not pass; ``bücher.de`` matches ``xn--bcher-kva.de`` either way round; an entry
  ``amazonaws.com`` does not admit ``bucket.s3.amazonaws.com``. Entries that are public suffixes
  (``com``, ``co.uk``, ``github.io``) or otherwise invalid admit nothing (the control plane refuses
  them; one that slips in is dropped and logged once per policy). IP-literal hosts only match an
  identical entry. The rules are ``handtrace.core.domains``, shared with the agent.

A browser row with a url must pass both the app and the domain test. The stored url keeps
scheme, normalised host, port and path only: userinfo, query string and fragment are removed
(``https://Docs.Google.com/d/1?x=1#h`` -> ``https://docs.google.com/d/1``; ``https://bücher.de/``
-> ``https://xn--bcher-kva.de/``).

Hosts are parsed and judged once per distinct url in the frame, then mapped back to rows by a
vectorised replace; there is no Python work per event.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

from handtrace.core.domains import INVALID_URL, NOT_ALLOWLISTED_DOMAIN, normalised_domains, url_verdict
from handtrace.stream.steps import BatchContext, StepResult, latest_row

__all__ = ["INVALID_URL", "NOT_ALLOWLISTED_APP", "NOT_ALLOWLISTED_DOMAIN", "NO_APP_CONTEXT", "AllowlistStep",
           "fill_app_context"]

NO_APP_CONTEXT = "no_app_context"
NOT_ALLOWLISTED_APP = "not_allowlisted_app"


def fill_app_context(frame: pl.DataFrame, columns: Iterable[str] = ("app_id", "url")) -> pl.DataFrame:
    """``frame`` with ``app_id`` (and the other ``columns``) filled, within each batch, from the
    latest earlier row that has an ``app_id``; a row's own non-null values win. Current agents
    stamp every event, so the common case is a null count and nothing else."""
    cols = list(columns)
    if frame.get_column("app_id").null_count() == 0:
        return frame  # every row starts its own context: filling changes nothing
    has_app = pl.col("app_id").is_not_null()
    # A column is taken from the latest row that starts a context (has an app_id) or has its own
    # value of that column, so a context start without a url resets the url to null.
    return frame.with_columns(
        [pl.col(c).gather(latest_row(has_app | pl.col(c).is_not_null())) for c in cols]
    )


@dataclass(frozen=True)
class AllowlistStep:
    """Keeps only rows of allowlisted apps and domains (``ctx.policy``); fills the app context
    within batches and strips userinfo, query and fragment from stored urls. No config beyond
    the policy, which comes with each frame."""

    name: str = "allowlist"

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult:
        if frame.height == 0:
            return StepResult(frame)
        policy = ctx.policy
        domains = normalised_domains(policy.allowed_domains)
        filled = fill_app_context(frame)

        verdict: dict[str, str | None] = {}
        cleaned: dict[str, str] = {}
        for url in filled.get_column("url").drop_nulls().unique().to_list():
            verdict[url], stored = url_verdict(url, domains)
            if stored is not None:
                cleaned[url] = stored

        app = pl.col("app_id")
        apps = pl.Series(sorted(policy.allowed_apps), dtype=pl.String).implode()
        url_reason = pl.col("url").replace_strict(verdict, default=None, return_dtype=pl.String)
        reason = (
            pl.when(app.is_null()).then(pl.lit(NO_APP_CONTEXT))
            .when(~app.is_in(apps)).then(pl.lit(NOT_ALLOWLISTED_APP))
            .otherwise(url_reason)
        )
        tagged = filled.with_columns(reason.alias("_reject"))
        counts = dict(
            tagged.filter(pl.col("_reject").is_not_null()).group_by("_reject").len().iter_rows()
        )
        kept = tagged.filter(pl.col("_reject").is_null()).drop("_reject")
        kept = kept.with_columns(
            pl.col("url").replace_strict(cleaned, default=None, return_dtype=pl.String)
        )
        return StepResult(kept, counts)
