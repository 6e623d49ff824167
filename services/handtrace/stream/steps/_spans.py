"""Shared by the pause and exemption steps: which rows fall inside an employee's time spans."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl


def drop_rows_in_spans(frame: pl.DataFrame, spans: Sequence[tuple[str, int, int]]) -> pl.DataFrame:
    """``frame`` without rows whose capture time lies in [from, to) of a span of their employee.

    Vectorised: rows are joined with their employee's spans (a handful per employee).
    """
    if not spans or frame.height == 0:
        return frame
    table = pl.DataFrame(list(spans), schema={"employee_id": pl.String, "_from": pl.Int64, "_to": pl.Int64},
                         orient="row")
    row = pl.int_range(pl.len(), dtype=pl.UInt32)
    hits = (
        frame.select(pl.col("captured_at_us").dt.epoch("us").alias("_ts"), pl.col("employee_id"), row.alias("_row"))
        .join(table, on="employee_id", how="inner")
        .filter((pl.col("_ts") >= pl.col("_from")) & (pl.col("_ts") < pl.col("_to")))
        .get_column("_row")
        .unique()
    )
    if hits.len() == 0:
        return frame
    return frame.filter(~row.is_in(hits.implode()))
