"""Cut a user's click stream into sessions at inactivity gaps.

    frame = sessionize(frame, user_column="user_id", gap_minutes=30.0)

For logs that carry a user but no session id (Retail Rocket, Taobao). A new session
starts at a user's first event and after every gap strictly longer than
`gap_minutes`; session ids are f"{user}:{n}" with n counting from 0 per user, so the
same input always gives the same ids.
"""
from __future__ import annotations

import polars as pl

from stream.errors import ClickscoreError

MS_PER_MINUTE = 60_000


def sessionize(frame: pl.LazyFrame | pl.DataFrame, user_column: str, gap_minutes: float,
               order_column: str | None = None) -> pl.LazyFrame:
    """Add `session_id` (string) to a frame with `user_column` and `timestamp` (epoch ms).

    `order_column` breaks timestamp ties (the input's row order); rows come back
    sorted by user, timestamp, order.
    """
    if not gap_minutes > 0:
        raise ClickscoreError(f"--session-gap-minutes must be > 0, got {gap_minutes}")
    gap_ms = int(round(gap_minutes * MS_PER_MINUTE))
    keys = [user_column, "timestamp"] + ([order_column] if order_column else [])
    user = pl.col(user_column)
    # A row opens a session when the user changes or the pause exceeds the gap.
    opens = (user != user.shift(1)).fill_null(True) | (
        (pl.col("timestamp") - pl.col("timestamp").shift(1)) > gap_ms)
    return (
        frame.lazy()
        .sort(keys, maintain_order=True)
        .with_columns(opens.alias("_opens"))
        # n-th session of this user, 0-based: running count of openings minus one.
        .with_columns((pl.col("_opens").cast(pl.Int32).cum_sum().over(user_column) - 1).alias("_n"))
        .with_columns(pl.format("{}:{}", user.cast(pl.String), pl.col("_n")).alias("session_id"))
        .drop("_opens", "_n")
    )
