"""Synthetic click logs in the canonical format, for tests, demos and load tests.

    clickscore simulate --sessions 20000 --seed 0 --out data/sim.parquet
    clickscore simulate --sessions 500 --seed 3 --buy-share 0.1 --out sim.jsonl

The columns and their order are the contract's (docs/CONTRACTS.md): session_id,
event_type, item_id, category_id, price, timestamp (UTC epoch ms, int64), user_id,
event_id, split. The file format follows the extension of --out (.parquet, .csv,
.jsonl). Rows are ordered by session (sessions in order of their first event), then
timestamp. The same seed and arguments give the same rows (and the same parquet bytes).

What is simulated (the generative story, so a reader knows what a model can learn):

- Catalogue: `--categories` categories with Zipf popularity and a lognormal price
  level each; `--items` items, each in one category, with Zipf popularity (ids are
  shuffled, so an item id says nothing about its popularity) and a price lognormal
  around its category's level.
- Item-to-item transitions: every item has a few "next" items (`N_NEXT`), mostly in
  its own category, picked by popularity; a shopper follows one of them with a
  session-specific probability, so the current item predicts the next one far better
  than global popularity does.
- Session starts over [--start, --start + --days) with a daily (lunch and evening
  peaks, quiet nights, UTC) and a weekly (busier weekends) rhythm.
- Users: a pool of returning users with a per-user buying propensity drawn from a
  Beta distribution whose mean is --buy-share, so a session buys with probability
  exactly --buy-share in expectation.
- Session lengths: a discretised lognormal (heavy tail: about 1% of sessions exceed
  100 events at the defaults; capped at MAX_SESSION_EVENTS).
- Buyers differ from browsers: longer sessions, longer dwell, a "home" category
  chosen with a bias towards expensive categories and left less often (fewer
  distinct categories), more add-to-carts and more revisits of items already seen.
  A buying session ends with 1-2 `transaction` events on distinct items it added to
  cart, after a checkout pause. Some browsers add to cart and abandon.
- Dwell times (the gap after an event) are lognormal, longer after an add-to-cart
  than after a view, and longer for buyers.
- Nothing about a session's purchase is written into its events before the first
  transaction: ids are assigned in order of session start, every event has all
  fields, and transactions come strictly after the last view/add-to-cart.

Split (temporal, on the configured window, not on the realised data): with span =
--days, a session is `test` when it starts in the last 15% of the span, `valid` when
it starts in the 15% before that, `train` otherwise.

Ids: session_id `s<rank>` (rank of the session's first event), user_id `u<n>`,
item_id and category_id decimal strings, event_id `<seed>-<row>` (unique per file).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from stream.errors import ClickscoreError
from stream.events import InvalidEvent, parse_timestamp

COLUMNS = ("session_id", "event_type", "item_id", "category_id", "price", "timestamp",
           "user_id", "event_id", "split")
ARROW_SCHEMA = pa.schema([
    ("session_id", pa.string()), ("event_type", pa.string()), ("item_id", pa.string()),
    ("category_id", pa.string()), ("price", pa.float64()), ("timestamp", pa.int64()),
    ("user_id", pa.string()), ("event_id", pa.string()), ("split", pa.string()),
])
FORMATS = (".parquet", ".csv", ".jsonl")

VIEW, ADDTOCART, TRANSACTION = 1, 2, 3            # the codes of stream.events.EVENT_TYPES
EVENT_NAMES = {VIEW: "view", ADDTOCART: "addtocart", TRANSACTION: "transaction"}
SPLIT_NAMES = {0: "train", 1: "valid", 2: "test"}
VALID_SHARE = 0.15
TEST_SHARE = 0.15

MAX_SESSION_EVENTS = 1000       # bounds the generator's step loop; ~1e-4 of sessions hit it
N_NEXT = 5                      # "next" items per item
NEXT_WEIGHTS = np.array([0.35, 0.25, 0.18, 0.12, 0.10])
NEXT_SAME_CATEGORY = 0.85       # share of an item's next items in its own category
USERS_PER_SESSION = 0.5         # user pool size relative to the number of sessions
PROPENSITY_CONCENTRATION = 8.0  # Beta(a, b) with a + b = this: spread of users' buy propensity


@dataclass(frozen=True)
class Behaviour:
    """How one kind of shopper moves; probabilities are per step after the first event."""
    length_mu: float          # lognormal session length (events before any transaction)
    length_sigma: float
    min_length: int
    cart: float               # add the current item to the cart
    revisit: float            # go back to the previously viewed item
    follow: float             # follow one of the current item's next items
    stay_home: float          # when jumping: stay in the home category (else anywhere)
    view_dwell_s: float       # median seconds spent after a view
    cart_dwell_s: float       # median seconds spent after an add-to-cart
    dwell_sigma: float


BROWSER = Behaviour(length_mu=1.2, length_sigma=1.5, min_length=1, cart=0.004, revisit=0.08,
                    follow=0.55, stay_home=0.35, view_dwell_s=25.0, cart_dwell_s=40.0,
                    dwell_sigma=1.0)
# A browser who uses the cart (and abandons it): this share of browsers, at this rate,
# which makes about 70% of the sessions with an add-to-cart end without a purchase.
CART_ABANDONER_SHARE = 0.35
ABANDONER_CART = 0.07
BUYER = Behaviour(length_mu=2.1, length_sigma=1.1, min_length=2, cart=0.08, revisit=0.15,
                  follow=0.55, stay_home=0.75, view_dwell_s=35.0, cart_dwell_s=60.0,
                  dwell_sigma=1.0)
BUYER_PRICE_BIAS = 1.0          # buyers pick home categories with weight popularity * level**this
SECOND_TRANSACTION = 0.3        # a buyer with >= 2 distinct cart items buys two with this chance
CHECKOUT_DWELL_S, CHECKOUT_SIGMA = 120.0, 0.8
BETWEEN_TRANSACTIONS_S, BETWEEN_SIGMA = 3.0, 0.5


@dataclass(frozen=True)
class SimulationConfig:
    sessions: int = 10_000
    seed: int = 0
    buy_share: float = 0.05
    items: int = 5_000
    categories: int = 50
    start_ms: int = 1_767_571_200_000   # 2026-01-05T00:00:00Z
    days: float = 14.0

    def check(self) -> None:
        """Raise ClickscoreError saying which argument to fix."""
        if self.sessions < 1:
            raise ClickscoreError(f"--sessions must be at least 1, got {self.sessions}")
        if not 0.0 <= self.buy_share <= 1.0:
            raise ClickscoreError(f"--buy-share is a share of sessions in [0, 1], got {self.buy_share}")
        if self.categories < 1:
            raise ClickscoreError(f"--categories must be at least 1, got {self.categories}")
        if self.items < max(2, self.categories):
            raise ClickscoreError(f"--items must be at least 2 and at least --categories "
                                  f"({self.categories}), got {self.items}")
        if not self.days > 0:
            raise ClickscoreError(f"--days must be > 0, got {self.days}")


@dataclass(frozen=True)
class Catalogue:
    item_category: np.ndarray      # (I,) int
    item_price: np.ndarray         # (I,) float64
    item_cdf: np.ndarray           # (I,) cumulative popularity, ends at 1
    by_category: np.ndarray        # (I,) item indices sorted by category
    by_category_cdf: np.ndarray    # (I,) cumulative popularity along by_category
    category_lo: np.ndarray        # (C,) cdf value before each category's block
    category_mass: np.ndarray      # (C,) popularity mass of each category
    category_start: np.ndarray     # (C,) index in by_category of each category's block
    category_end: np.ndarray       # (C,) index in by_category past each category's block
    category_popularity: np.ndarray  # (C,) sums to 1
    category_level: np.ndarray     # (C,) price level
    next_items: np.ndarray         # (I, N_NEXT) int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n items by global popularity."""
        return np.minimum(np.searchsorted(self.item_cdf, rng.random(n), side="right"),
                          len(self.item_cdf) - 1)

    def sample_in(self, rng: np.random.Generator, categories: np.ndarray) -> np.ndarray:
        """One item per entry of `categories`, by popularity within that category."""
        target = self.category_lo[categories] + rng.random(len(categories)) * self.category_mass[categories]
        position = np.searchsorted(self.by_category_cdf, target, side="right")
        # Clamp: a float rounding must never step into a neighbouring category's block.
        position = np.clip(position, self.category_start[categories], self.category_end[categories] - 1)
        return self.by_category[position]


def zipf_weights(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Zipf weights over n entries in a random order (an id says nothing about its rank)."""
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights[rng.permutation(n)] / weights.sum()


def build_catalogue(rng: np.random.Generator, n_items: int, n_categories: int) -> Catalogue:
    category_popularity = zipf_weights(rng, n_categories, 0.8)
    category_level = np.exp(rng.normal(np.log(25.0), 0.9, n_categories))
    # Every category gets one item, the rest follow category popularity.
    item_category = np.concatenate([
        np.arange(n_categories),
        rng.choice(n_categories, n_items - n_categories, p=category_popularity)])
    item_category = item_category[rng.permutation(n_items)]
    item_price = np.round(np.maximum(
        category_level[item_category] * np.exp(rng.normal(0.0, 0.3, n_items)), 0.5), 2)
    item_popularity = zipf_weights(rng, n_items, 1.05)
    item_cdf = np.cumsum(item_popularity)
    item_cdf /= item_cdf[-1]

    by_category = np.argsort(item_category, kind="stable")
    by_category_cdf = np.cumsum(item_popularity[by_category])
    category_end = np.cumsum(np.bincount(item_category, minlength=n_categories))
    category_start = category_end - np.bincount(item_category, minlength=n_categories)
    category_lo = np.where(category_start > 0, by_category_cdf[np.maximum(category_start - 1, 0)], 0.0)
    category_mass = by_category_cdf[category_end - 1] - category_lo
    catalogue = Catalogue(item_category, item_price, item_cdf, by_category, by_category_cdf,
                          category_lo, category_mass, category_start, category_end, category_popularity,
                          category_level, np.empty((n_items, N_NEXT), dtype=np.int64))

    same = rng.random((n_items, N_NEXT)) < NEXT_SAME_CATEGORY   # (I, N_NEXT)
    in_category = catalogue.sample_in(rng, np.repeat(item_category, N_NEXT)).reshape(n_items, N_NEXT)
    anywhere = catalogue.sample(rng, n_items * N_NEXT).reshape(n_items, N_NEXT)
    next_items = np.where(same, in_category, anywhere)
    # A next item equal to the item itself would be a revisit; send it elsewhere.
    self_loop = next_items == np.arange(n_items)[:, None]
    next_items[self_loop] = (np.nonzero(self_loop)[0] + rng.integers(1, n_items, int(self_loop.sum()))) % n_items
    catalogue.next_items[:] = next_items
    return catalogue


def seasonal_starts(rng: np.random.Generator, n: int, start_ms: int, span_ms: int) -> np.ndarray:
    """Absolute start times (epoch ms) of n sessions in [start_ms, start_ms + span_ms).

    Intensity = daily profile (quiet nights, lunch and evening peaks, UTC) x weekly
    profile (busier weekends), evaluated on ~1-minute bins; a start is a bin drawn by
    intensity plus a uniform offset inside it.
    """
    n_bins = max(1, int(np.ceil(span_ms / 60_000)))
    width = span_ms / n_bins
    centre_ms = start_ms + (np.arange(n_bins) + 0.5) * width
    hour = (centre_ms / 3_600_000.0) % 24.0
    weekday = ((centre_ms // 86_400_000) + 3) % 7          # 1970-01-01 was a Thursday; 0 = Monday
    daily = (0.15 + 0.6 * np.exp(-0.5 * ((hour - 12.5) / 2.0) ** 2)
             + 1.0 * np.exp(-0.5 * ((hour - 20.5) / 2.2) ** 2))
    weekly = np.select([weekday == 5, weekday == 6], [1.2, 1.3], 1.0)
    intensity = daily * weekly
    cdf = np.cumsum(intensity)
    cdf /= cdf[-1]
    bins = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), n_bins - 1)
    offset = (bins + rng.random(n)) * width
    return start_ms + np.minimum(offset.astype(np.int64), span_ms - 1)


def _lognormal_ms(rng: np.random.Generator, median_s: np.ndarray | float, sigma: np.ndarray | float,
                  n: int) -> np.ndarray:
    seconds = median_s * np.exp(sigma * rng.standard_normal(n))
    return np.maximum(np.rint(seconds * 1000.0), 1).astype(np.int64)


def simulate(config: SimulationConfig) -> pl.DataFrame:
    """The click log for `config` as a DataFrame with the contract's columns and order."""
    config.check()
    rng = np.random.default_rng(config.seed)
    catalogue = build_catalogue(rng, config.items, config.categories)
    n = config.sessions

    # -- sessions: user, buyer or not, start, length (in order of start) ---------------
    span_ms = max(1, int(round(config.days * 86_400_000)))
    start = np.sort(seasonal_starts(rng, n, config.start_ms, span_ms), kind="stable")   # (S,)
    n_users = max(1, int(round(n * USERS_PER_SESSION)))
    user_weights = 1.0 / np.arange(1, n_users + 1) ** 0.6
    user = rng.choice(n_users, n, p=user_weights / user_weights.sum())                # (S,)
    share = config.buy_share
    if 0.0 < share < 1.0:
        propensity = rng.beta(PROPENSITY_CONCENTRATION * share,
                              PROPENSITY_CONCENTRATION * (1 - share), n_users)
    else:
        propensity = np.full(n_users, share)
    buyer = rng.random(n) < propensity[user]                                            # (S,)

    def pick(buyer_value, browser_value):
        return np.where(buyer, buyer_value, browser_value)

    length = np.exp(pick(BUYER.length_mu, BROWSER.length_mu)
                    + pick(BUYER.length_sigma, BROWSER.length_sigma) * rng.standard_normal(n))
    length = np.minimum(np.floor(length).astype(np.int64) + pick(BUYER.min_length, BROWSER.min_length),
                        MAX_SESSION_EVENTS)                                             # (S,)
    abandoner = ~buyer & (rng.random(n) < CART_ABANDONER_SHARE)
    p_cart = np.where(abandoner, ABANDONER_CART, pick(BUYER.cart, BROWSER.cart))
    p_revisit = p_cart + pick(BUYER.revisit, BROWSER.revisit)
    p_follow = p_revisit + pick(BUYER.follow, BROWSER.follow)
    # Cart abandoners shop with intent too: they stay in their category like buyers.
    p_stay_home = np.where(buyer | abandoner, BUYER.stay_home, BROWSER.stay_home)
    # Every buyer adds something to the cart at least once, at a uniform step >= 1.
    forced_cart = np.where(buyer, 1 + np.floor(rng.random(n) * (length - 1)).astype(np.int64), -1)
    buyer_category_weights = catalogue.category_popularity * catalogue.category_level ** BUYER_PRICE_BIAS
    home = np.where(
        buyer,
        rng.choice(config.categories, n, p=buyer_category_weights / buyer_category_weights.sum()),
        rng.choice(config.categories, n, p=catalogue.category_popularity))               # (S,)

    # -- views and add-to-carts, one vectorised step for all sessions still going ------
    offset = np.cumsum(length) - length                                  # (S,) first row of each session
    n_events = int(length.sum())
    item = np.empty(n_events, dtype=np.int64)
    event_type = np.full(n_events, VIEW, dtype=np.int8)
    # Sessions sorted by length, longest first: those active at step t are a prefix.
    by_length = np.argsort(-length, kind="stable")
    # active_count[step] = number of sessions with length > step, for step in [0, max length)
    active_count = np.searchsorted(-length[by_length], -np.arange(int(length.max())), side="left")
    first_in_home = buyer | (rng.random(n) < 0.5)
    current = np.where(first_in_home, catalogue.sample_in(rng, home), catalogue.sample(rng, n))[by_length]
    previous = current.copy()
    row = offset[by_length]
    item[row] = current
    s_cart, s_revisit, s_follow = p_cart[by_length], p_revisit[by_length], p_follow[by_length]
    s_stay, s_home, s_forced = p_stay_home[by_length], home[by_length], forced_cart[by_length]
    next_cdf = np.cumsum(NEXT_WEIGHTS) / NEXT_WEIGHTS.sum()
    for step in range(1, len(active_count)):
        k = int(active_count[step])           # sessions with length > step
        current, previous = current[:k], previous[:k]
        u = rng.random(k)
        cart = (u < s_cart[:k]) | (s_forced[:k] == step)
        revisit = ~cart & (u < s_revisit[:k])
        follow = ~cart & ~revisit & (u < s_follow[:k])
        jump = ~(cart | revisit | follow)
        chosen = current.copy()
        chosen[revisit] = previous[revisit]
        idx = np.flatnonzero(follow)
        choice = np.minimum(np.searchsorted(next_cdf, rng.random(len(idx)), side="right"), N_NEXT - 1)
        chosen[idx] = catalogue.next_items[current[idx], choice]
        idx = np.flatnonzero(jump)
        stay = rng.random(len(idx)) < s_stay[idx]
        chosen[idx[stay]] = catalogue.sample_in(rng, s_home[idx[stay]])
        chosen[idx[~stay]] = catalogue.sample(rng, int((~stay).sum()))
        position = row[:k] + step
        item[position] = chosen
        event_type[position[cart]] = ADDTOCART
        previous = np.where(cart | (chosen == current), previous, current)
        current = chosen

    session = np.repeat(np.arange(n), length)                            # (E,)
    step_of = np.arange(n_events) - offset[session]
    is_buyer_event = buyer[session]

    # -- dwell: the gap after each event; the last buyer event waits for checkout ------
    is_cart = event_type == ADDTOCART
    median = np.where(is_cart, pick(BUYER.cart_dwell_s, BROWSER.cart_dwell_s)[session],
                      pick(BUYER.view_dwell_s, BROWSER.view_dwell_s)[session])
    gap = _lognormal_ms(rng, median, pick(BUYER.dwell_sigma, BROWSER.dwell_sigma)[session], n_events)
    elapsed = np.cumsum(gap) - gap                                       # exclusive, global
    timestamp = start[session] + elapsed - elapsed[offset][session]
    last_row = offset + length - 1
    checkout = _lognormal_ms(rng, CHECKOUT_DWELL_S, CHECKOUT_SIGMA, n)

    # -- transactions: 1-2 distinct carted items, most recently carted first ----------
    cart_rows = np.flatnonzero(is_cart & is_buyer_event)
    order = np.lexsort((step_of[cart_rows], item[cart_rows], session[cart_rows]))
    cart_rows = cart_rows[order]
    last_of_item = np.ones(len(cart_rows), dtype=bool)                  # keep the last cart of each item
    last_of_item[:-1] = (session[cart_rows[1:]] != session[cart_rows[:-1]]) | \
                        (item[cart_rows[1:]] != item[cart_rows[:-1]])
    cart_rows = cart_rows[last_of_item]
    cart_rows = cart_rows[np.lexsort((-step_of[cart_rows], session[cart_rows]))]
    tx_session = session[cart_rows]
    first = np.ones(len(cart_rows), dtype=bool)
    first[1:] = tx_session[1:] != tx_session[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(cart_rows)), 0))
    rank = np.arange(len(cart_rows)) - group_start
    wanted = 1 + (rng.random(n) < SECOND_TRANSACTION)
    keep = rank < wanted[tx_session]
    cart_rows, tx_session, rank = cart_rows[keep], tx_session[keep], rank[keep]
    between = _lognormal_ms(rng, BETWEEN_TRANSACTIONS_S, BETWEEN_SIGMA, len(cart_rows))
    tx_time = timestamp[last_row[tx_session]] + checkout[tx_session] + np.where(rank > 0, between, 0)

    # -- rows in contract order: session, then time (transactions last) ---------------
    all_session = np.concatenate([session, tx_session])
    all_step = np.concatenate([step_of, length[tx_session] + rank])
    order = np.lexsort((all_step, all_session))
    all_item = np.concatenate([item, item[cart_rows]])[order]
    all_type = np.concatenate([event_type, np.full(len(cart_rows), TRANSACTION, np.int8)])[order]
    all_time = np.concatenate([timestamp, tx_time])[order]
    all_session = all_session[order]
    start_offset = start - config.start_ms
    split = np.select([start_offset >= (1 - TEST_SHARE) * span_ms,
                       start_offset >= (1 - TEST_SHARE - VALID_SHARE) * span_ms], [2, 1], 0)

    frame = pl.DataFrame({
        "session": all_session, "type": all_type, "item": all_item,
        "category": catalogue.item_category[all_item], "price": catalogue.item_price[all_item],
        "timestamp": all_time, "user": user[all_session], "split": split[all_session],
    })
    return frame.select(
        session_id=pl.format("s{}", pl.col("session")),
        event_type=pl.col("type").replace_strict(EVENT_NAMES, return_dtype=pl.String),
        item_id=pl.col("item").cast(pl.String),
        category_id=pl.col("category").cast(pl.String),
        price=pl.col("price").cast(pl.Float64),
        timestamp=pl.col("timestamp").cast(pl.Int64),
        user_id=pl.format("u{}", pl.col("user")),
        event_id=pl.format(f"{config.seed}-{{}}", pl.int_range(pl.len())),
        split=pl.col("split").replace_strict(SPLIT_NAMES, return_dtype=pl.String),
    )


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ClickscoreError(f"--out {str(path)!r} must end in one of {', '.join(FORMATS)} "
                              "(the extension picks the file format)")
    return suffix


def write_events(frame: pl.DataFrame, path: Path) -> None:
    """Write the log in the format named by the extension; parquet keeps the contract's types."""
    suffix = output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        pq.write_table(frame.to_arrow().cast(ARROW_SCHEMA), path)
    elif suffix == ".csv":
        frame.write_csv(path)
    else:
        frame.write_ndjson(path)


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    try:
        start_ms = parse_timestamp(args.start)
    except InvalidEvent as exc:
        raise ClickscoreError(f"--start {args.start!r} is not an ISO-8601 time such as 2026-01-05T00:00:00Z") from None
    config = SimulationConfig(sessions=args.sessions, seed=args.seed, buy_share=args.buy_share,
                              items=args.items, categories=args.categories, start_ms=start_ms,
                              days=args.days)
    config.check()
    return config


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    path = Path(args.out)
    output_format(path)                       # fail on a bad extension before the work
    began = time.perf_counter()
    frame = simulate(config)
    write_events(frame, path)
    seconds = time.perf_counter() - began
    buying = frame.filter(pl.col("event_type") == "transaction")["session_id"].n_unique()
    print(f"simulated {config.sessions} sessions, {frame.height} events, "
          f"buy share {buying / config.sessions:.3f}, {frame['item_id'].n_unique()} items "
          f"-> {path} ({seconds:.1f} s)")
    return 0
