"""Marketing triggers: a pure rule engine over one session's stream of buy probabilities.

Rules live in a TOML file (`--rules deploy/rules.toml`), one `[[rule]]` table each:

    [[rule]]
    name = "high_intent"          # unique; the trigger's `rule` field
    kind = "high_intent"          # fires when the probability rises above fire_above
    fire_above = 0.6
    rearm_below = 0.4             # ... and may fire again only after falling below this
    require_no_cart = true
    cooldown_s = 600              # event time, per session
    once_per_session = false

    [[rule]]
    name = "abandonment_risk"
    kind = "abandonment"          # armed once above armed_above, fires when it falls below fire_below
    armed_above = 0.5
    fire_below = 0.3
    require_cart = true
    cooldown_s = 1800
    once_per_session = true

Semantics (hysteresis): a rule is *armed* or not. `high_intent` starts armed, fires
on an observation with probability > fire_above, disarms, and re-arms on an
observation < rearm_below; `abandonment` starts disarmed, arms on > armed_above and
fires on < fire_below. So a probability hovering around the fire threshold fires once,
not on every event. A rule only fires while its conditions hold (cart, cooldown,
once-per-session); an armed rule whose conditions do not hold yet stays armed and
fires on the first later observation, still beyond the threshold, where they do
(a cooldown delays a trigger, it does not drop it).

    rules = load_rules("deploy/rules.toml")            # ClickscoreError names file:line
    state, triggers = rules.evaluate(state, observation)  # state=None for a new session
    table[session_id] = state.to_bytes()               # small, JSON, fits a Faust table

Pure: no I/O after loading, no clock unless `now_ms` is left out (then `fired_at` is
the wall clock). Duplicated observations (same event_id twice in a row, as a worker
re-delivers after a crash) change nothing and fire nothing.
"""
from __future__ import annotations

import json
import math
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from stream.errors import ClickscoreError

STATE_VERSION = 1
KINDS = ("high_intent", "abandonment")
# kind -> (fire threshold key, arm threshold key, fires when above the fire threshold?)
_THRESHOLDS: dict[str, tuple[str, str, bool]] = {
    "high_intent": ("fire_above", "rearm_below", True),
    "abandonment": ("fire_below", "armed_above", False),
}
_COMMON_KEYS = ("name", "kind", "description", "require_cart", "require_no_cart",
                "cooldown_s", "once_per_session")


# -- data -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreObservation:
    """One scored event of a session, as the worker sees it after the model call."""
    session_id: str
    buy_probability: float
    timestamp: int            # event time, UTC epoch ms
    has_cart: bool            # the session has had an addtocart so far
    event_count: int          # events in the session so far, this one included
    event_id: str | None = None


@dataclass(frozen=True)
class Trigger:
    session_id: str
    rule: str
    buy_probability: float
    evidence: dict[str, Any]
    timestamp: int            # event time of the observation that fired it, epoch ms
    fired_at: int             # wall-clock time the engine produced it, epoch ms
    kind: str = ""
    event_id: str | None = None

    @property
    def trigger_id(self) -> str:
        """Stable across re-deliveries of the same event: receivers dedupe on it."""
        return f"{self.session_id}:{self.rule}:{self.event_id or self.timestamp}"

    def to_dict(self) -> dict[str, Any]:
        return {"trigger_id": self.trigger_id, "session_id": self.session_id, "rule": self.rule,
                "kind": self.kind, "buy_probability": self.buy_probability,
                "evidence": self.evidence, "timestamp": self.timestamp,
                "fired_at": self.fired_at, "event_id": self.event_id}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "Trigger":
        raw = json.loads(data)
        return cls(session_id=raw["session_id"], rule=raw["rule"],
                   buy_probability=float(raw["buy_probability"]), evidence=dict(raw["evidence"]),
                   timestamp=int(raw["timestamp"]), fired_at=int(raw["fired_at"]),
                   kind=raw.get("kind", ""), event_id=raw.get("event_id"))


@dataclass(frozen=True)
class RuleState:
    armed: bool
    last_fired_ms: int | None = None
    fired_count: int = 0


@dataclass(frozen=True)
class SessionTriggerState:
    """Per-session state of every rule; serialises to a few dozen bytes of JSON."""
    rules: Mapping[str, RuleState] = field(default_factory=dict)
    previous_probability: float | None = None
    max_probability: float | None = None
    last_event_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"v": STATE_VERSION, "prev": self.previous_probability,
                "max": self.max_probability, "last_event": self.last_event_id,
                "rules": {name: [int(s.armed), s.last_fired_ms, s.fired_count]
                          for name, s in self.rules.items()}}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "SessionTriggerState":
        if raw.get("v") != STATE_VERSION:
            raise ValueError(f"trigger state version {raw.get('v')!r}, expected {STATE_VERSION}")
        return cls(rules={name: RuleState(bool(armed), fired_ms, int(count))
                          for name, (armed, fired_ms, count) in raw["rules"].items()},
                   previous_probability=raw["prev"], max_probability=raw["max"],
                   last_event_id=raw["last_event"])

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SessionTriggerState":
        return cls.from_dict(json.loads(data))


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    fire_threshold: float
    arm_threshold: float
    require_cart: bool = False
    require_no_cart: bool = False
    cooldown_s: float = 0.0
    once_per_session: bool = False
    description: str = ""

    @property
    def fires_above(self) -> bool:
        return _THRESHOLDS[self.kind][2]

    @property
    def thresholds(self) -> dict[str, float]:
        fire_key, arm_key, _ = _THRESHOLDS[self.kind]
        return {fire_key: self.fire_threshold, arm_key: self.arm_threshold}

    def initial_state(self) -> RuleState:
        # high_intent may fire on a session's first event; abandonment needs a high first.
        return RuleState(armed=self.fires_above)

    def beyond_fire(self, probability: float) -> bool:
        return probability > self.fire_threshold if self.fires_above else probability < self.fire_threshold

    def beyond_arm(self, probability: float) -> bool:
        return probability < self.arm_threshold if self.fires_above else probability > self.arm_threshold

    def conditions_hold(self, state: RuleState, score: ScoreObservation) -> bool:
        if self.require_cart and not score.has_cart:
            return False
        if self.require_no_cart and score.has_cart:
            return False
        if self.once_per_session and state.fired_count > 0:
            return False
        if state.last_fired_ms is not None and self.cooldown_s > 0:
            # Event time: an out-of-order event older than the last trigger is inside it.
            if score.timestamp - state.last_fired_ms < self.cooldown_s * 1000:
                return False
        return True


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    source: str = "<rules>"

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(rule.name for rule in self.rules)

    def initial_state(self) -> SessionTriggerState:
        return SessionTriggerState(rules={rule.name: rule.initial_state() for rule in self.rules})

    def evaluate(self, state: SessionTriggerState | None, score: ScoreObservation,
                 now_ms: int | None = None) -> tuple[SessionTriggerState, list[Trigger]]:
        """(new state, triggers fired by this observation); `state` is not modified."""
        if state is None:
            state = self.initial_state()
        if score.event_id is not None and score.event_id == state.last_event_id:
            return state, []   # the same event delivered twice
        probability = float(score.buy_probability)
        max_probability = probability if state.max_probability is None \
            else max(state.max_probability, probability)
        fired_at = int(time.time() * 1000) if now_ms is None else int(now_ms)
        new_rules: dict[str, RuleState] = {}
        triggers: list[Trigger] = []
        for rule in self.rules:
            # A rule added to the file after the session started begins fresh;
            # state of a rule removed from the file is dropped.
            rule_state = state.rules.get(rule.name) or rule.initial_state()
            if not rule_state.armed and rule.beyond_arm(probability):
                rule_state = RuleState(True, rule_state.last_fired_ms, rule_state.fired_count)
            if (rule_state.armed and rule.beyond_fire(probability)
                    and rule.conditions_hold(rule_state, score)):
                rule_state = RuleState(False, score.timestamp, rule_state.fired_count + 1)
                triggers.append(Trigger(
                    session_id=score.session_id, rule=rule.name, kind=rule.kind,
                    buy_probability=probability, timestamp=score.timestamp, fired_at=fired_at,
                    event_id=score.event_id,
                    evidence={"thresholds": rule.thresholds,
                              "crossed": _THRESHOLDS[rule.kind][0],
                              "previous_probability": state.previous_probability,
                              "max_probability": max_probability,
                              "has_cart": score.has_cart,
                              "event_count": score.event_count,
                              "fired_count": rule_state.fired_count}))
            new_rules[rule.name] = rule_state
        return SessionTriggerState(rules=new_rules, previous_probability=probability,
                                   max_probability=max_probability,
                                   last_event_id=score.event_id), triggers


# -- loading ------------------------------------------------------------------------------

_TABLE_HEADER = re.compile(r"^\s*\[")
_RULE_HEADER = re.compile(r"^\s*\[\[\s*rule\s*\]\]\s*(#.*)?$")


class _Lines:
    """Line numbers for a parsed TOML file (tomllib gives values, not positions)."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.rule_starts = [i for i, line in enumerate(self.lines) if _RULE_HEADER.match(line)]

    def of_rule(self, index: int) -> int | None:
        if index < len(self.rule_starts):
            return self.rule_starts[index] + 1
        # Not written as [[rule]] tables (e.g. `rule = [{...}]`): point at the key.
        return self.of_top_key("rule")

    def of_key(self, index: int, key: str) -> int | None:
        """Line of `key = ...` inside the index-th [[rule]] table (else the table's line)."""
        if index >= len(self.rule_starts):
            return self.of_rule(index)
        start = self.rule_starts[index]
        for i in range(start + 1, len(self.lines)):
            if _TABLE_HEADER.match(self.lines[i]):
                break
            if _key_pattern(key).match(self.lines[i]):
                return i + 1
        return start + 1

    def of_top_key(self, key: str) -> int | None:
        """Line of a top-level `key = ...` or `[key]`/`[[key]]` header."""
        header = re.compile(rf"^\s*\[\[?\s*{re.escape(key)}\s*[\].]")
        for i, line in enumerate(self.lines):
            if header.match(line):
                return i + 1
            if _TABLE_HEADER.match(line):
                return None   # top-level keys all come before the first table
            if _key_pattern(key).match(line):
                return i + 1
        return None


def _key_pattern(key: str) -> re.Pattern:
    name = re.escape(key)
    return re.compile(rf"""^\s*(?:{name}|"{name}"|'{name}')\s*[=.]""")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_rules(path: str | Path) -> RuleSet:
    """Read and validate a rules file; every error names the file, the line and the rule."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ClickscoreError(f"rules file {path}: {exc.strerror or exc}") from None
    return parse_rules(text, source=str(path))


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ClickscoreError(f"{source}: not valid TOML: {exc}") from None
    lines = _Lines(text)

    def fail(line: int | None, message: str) -> ClickscoreError:
        return ClickscoreError(f"{source}:{line}: {message}" if line else f"{source}: {message}")

    for key in document:
        if key != "rule":
            raise fail(lines.of_top_key(key), f"unknown top-level key {key!r} (expected [[rule]] tables)")
    tables = document.get("rule", [])
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise fail(lines.of_top_key("rule"), "expected one or more [[rule]] tables")

    rules: list[Rule] = []
    seen: dict[str, int | None] = {}
    for index, table in enumerate(tables):
        name = table.get("name")
        label = f"rule {name!r}" if isinstance(name, str) and name else f"rule #{index + 1}"

        def bad(key: str | None, message: str) -> ClickscoreError:
            line = lines.of_key(index, key) if key else lines.of_rule(index)
            return fail(line, f"{label}: {message}")

        if not isinstance(name, str) or not name.strip():
            raise bad("name" if "name" in table else None, "needs a non-empty string `name`")
        if name in seen:
            raise bad("name", f"duplicate rule name (first defined at line {seen[name]})")
        seen[name] = lines.of_key(index, "name")
        kind = table.get("kind")
        if kind not in KINDS:
            raise bad("kind" if "kind" in table else None,
                      f"`kind` must be one of {', '.join(KINDS)}, got {kind!r}")
        fire_key, arm_key, fires_above = _THRESHOLDS[kind]
        allowed = _COMMON_KEYS + (fire_key, arm_key)
        for key in table:
            if key not in allowed:
                raise bad(key, f"unknown key {key!r} for kind {kind} "
                               f"(allowed: {', '.join(sorted(allowed))})")
        for key in (fire_key, arm_key):
            if key not in table:
                raise bad(None, f"missing `{key}` (kind {kind} needs {fire_key} and {arm_key})")
            value = table[key]
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise bad(key, f"`{key}` must be a probability, a number in [0, 1], got {value!r}")
        fire, arm = float(table[fire_key]), float(table[arm_key])
        if fires_above and not fire > arm:
            raise bad(fire_key, f"`{fire_key}` ({fire}) must be greater than `{arm_key}` ({arm}): "
                                f"the gap between them is the hysteresis")
        if not fires_above and not fire < arm:
            raise bad(fire_key, f"`{fire_key}` ({fire}) must be less than `{arm_key}` ({arm}): "
                                f"the gap between them is the hysteresis")
        for key in ("require_cart", "require_no_cart", "once_per_session"):
            if key in table and not isinstance(table[key], bool):
                raise bad(key, f"`{key}` must be true or false, got {table[key]!r}")
        if table.get("require_cart") and table.get("require_no_cart"):
            raise bad("require_no_cart", "`require_cart` and `require_no_cart` cannot both be true")
        cooldown = table.get("cooldown_s", 0)
        if not _is_number(cooldown) or cooldown < 0:
            raise bad("cooldown_s", f"`cooldown_s` must be a number of seconds >= 0, got {cooldown!r}")
        description = table.get("description", "")
        if not isinstance(description, str):
            raise bad("description", f"`description` must be a string, got {description!r}")
        rules.append(Rule(name=name, kind=kind, fire_threshold=fire, arm_threshold=arm,
                          require_cart=table.get("require_cart", False),
                          require_no_cart=table.get("require_no_cart", False),
                          cooldown_s=float(cooldown),
                          once_per_session=table.get("once_per_session", False),
                          description=description))
    return RuleSet(rules=tuple(rules), source=source)

