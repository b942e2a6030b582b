"""Rule engine: crafted probability sequences for hysteresis, cooldown, once-per-session,
cart conditions, state serialisation, and load errors that name the line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream.errors import ClickscoreError
from stream.triggers import ScoreObservation, SessionTriggerState, Trigger, load_rules, parse_rules

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_767_571_200_000   # 2026-01-05T00:00:00Z, epoch ms


def high_intent(**overrides) -> str:
    keys = {"fire_above": 0.6, "rearm_below": 0.4, "require_no_cart": False,
            "cooldown_s": 0, "once_per_session": False, **overrides}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    return f'[[rule]]\nname = "hi"\nkind = "high_intent"\n{body}\n'


def abandonment(**overrides) -> str:
    keys = {"armed_above": 0.5, "fire_below": 0.3, "require_cart": False,
            "cooldown_s": 0, "once_per_session": False, **overrides}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    return f'[[rule]]\nname = "ab"\nkind = "abandonment"\n{body}\n'


def run(rules, probabilities, *, step_s=10.0, has_cart=False, session="s1"):
    """Feed a probability sequence; return the indices of the observations that fired."""
    state = None
    fired = []
    carts = has_cart if isinstance(has_cart, list) else [has_cart] * len(probabilities)
    for i, (p, cart) in enumerate(zip(probabilities, carts)):
        obs = ScoreObservation(session_id=session, buy_probability=p,
                               timestamp=T0 + int(i * step_s * 1000), has_cart=cart,
                               event_count=i + 1, event_id=f"e{i}")
        state, triggers = rules.evaluate(state, obs, now_ms=T0)
        # The state survives a round trip through the bytes a Faust table would hold.
        state = SessionTriggerState.from_bytes(state.to_bytes())
        fired += [(i, t.rule) for t in triggers]
    return fired


def test_high_intent_hysteresis_no_refire_while_hovering():
    rules = parse_rules(high_intent())
    # Crosses 0.6 once, then hovers around it (dips to 0.5 and 0.45: above rearm 0.4).
    assert run(rules, [0.1, 0.3, 0.65, 0.7, 0.55, 0.62, 0.45, 0.9, 0.61]) == [(2, "hi")]


def test_high_intent_refires_after_rearm():
    rules = parse_rules(high_intent())
    probabilities = [0.2, 0.7, 0.5, 0.39, 0.5, 0.61, 0.3, 0.8]
    assert run(rules, probabilities) == [(1, "hi"), (5, "hi"), (7, "hi")]


def test_thresholds_are_strict():
    rules = parse_rules(high_intent())
    assert run(rules, [0.6, 0.6, 0.4, 0.6]) == []          # never above 0.6
    assert run(rules, [0.61, 0.4, 0.61]) == [(0, "hi")]     # 0.4 is not below 0.4


def test_abandonment_needs_arming_first():
    rules = parse_rules(abandonment())
    assert run(rules, [0.1, 0.2, 0.1]) == []                # never armed: low all along
    assert run(rules, [0.2, 0.6, 0.4, 0.29]) == [(3, "ab")]
    # Hovering below fire_below fires once; re-arming above 0.5 allows another.
    assert run(rules, [0.6, 0.2, 0.25, 0.1, 0.45, 0.2, 0.55, 0.1]) == [(1, "ab"), (7, "ab")]


def test_cooldown_in_event_time_delays_not_drops():
    rules = parse_rules(high_intent(cooldown_s=60))
    # 10 s between events: fire at 0 s; re-armed and above again at 20 s and 30 s
    # (inside the 60 s cooldown); first observation after the cooldown still
    # above the threshold (60 s) fires.
    probabilities = [0.7, 0.3, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    assert run(rules, probabilities, step_s=10) == [(0, "hi"), (6, "hi")]
    # With slower events the same sequence fires on every crossing.
    assert run(rules, probabilities, step_s=61) == [(0, "hi"), (2, "hi")]


def test_once_per_session():
    once = parse_rules(high_intent(once_per_session=True))
    assert run(once, [0.7, 0.3, 0.7, 0.3, 0.7]) == [(0, "hi")]
    many = parse_rules(high_intent(once_per_session=False))
    assert run(many, [0.7, 0.3, 0.7, 0.3, 0.7]) == [(0, "hi"), (2, "hi"), (4, "hi")]


def test_require_no_cart_and_require_cart():
    no_cart = parse_rules(high_intent(require_no_cart=True))
    assert run(no_cart, [0.7, 0.8], has_cart=True) == []
    assert run(no_cart, [0.7, 0.8], has_cart=False) == [(0, "hi")]
    cart = parse_rules(abandonment(require_cart=True))
    assert run(cart, [0.6, 0.2], has_cart=False) == []
    assert run(cart, [0.6, 0.2], has_cart=True) == [(1, "ab")]
    # Armed without a cart; the cart arrives while the probability is still low: fires then.
    assert run(cart, [0.6, 0.2, 0.25], has_cart=[False, False, True]) == [(2, "ab")]


def test_sessions_are_independent_and_duplicates_fire_nothing():
    rules = parse_rules(high_intent())
    obs = ScoreObservation("s1", 0.9, T0, False, 1, "e1")
    state, fired = rules.evaluate(None, obs, now_ms=T0)
    assert len(fired) == 1
    again, fired_again = rules.evaluate(state, obs, now_ms=T0)   # re-delivered event
    assert fired_again == [] and again == state
    _, other = rules.evaluate(None, ScoreObservation("s2", 0.9, T0, False, 1, "e9"), now_ms=T0)
    assert [t.session_id for t in other] == ["s2"]


def test_trigger_evidence_and_json():
    rules = load_rules(ROOT / "deploy" / "rules.toml")
    state = None
    triggers = []
    for i, p in enumerate([0.2, 0.45, 0.72]):
        obs = ScoreObservation("s1", p, T0 + i * 1000, False, i + 1, f"e{i}")
        state, triggers = rules.evaluate(state, obs, now_ms=T0 + 5)
    (trigger,) = triggers
    assert trigger.rule == "high_intent" and trigger.kind == "high_intent"
    assert trigger.evidence == {"thresholds": {"fire_above": 0.6, "rearm_below": 0.4},
                                "crossed": "fire_above", "previous_probability": 0.45,
                                "max_probability": 0.72, "has_cart": False,
                                "event_count": 3, "fired_count": 1}
    assert trigger.timestamp == T0 + 2000 and trigger.fired_at == T0 + 5
    decoded = json.loads(trigger.to_json())
    assert decoded["trigger_id"] == "s1:high_intent:e2"
    assert Trigger.from_json(trigger.to_json()) == trigger
    # Small enough to live in a Faust table value.
    assert len(state.to_bytes()) < 200


def test_state_survives_rule_file_changes():
    old = parse_rules(high_intent())
    state, _ = old.evaluate(None, ScoreObservation("s", 0.9, T0, False, 1, "e1"), now_ms=T0)
    new = parse_rules(abandonment())   # "hi" removed, "ab" added
    state, fired = new.evaluate(state, ScoreObservation("s", 0.6, T0 + 1, False, 2, "e2"), now_ms=T0)
    assert set(state.rules) == {"ab"} and fired == []


# -- load errors name the file, the line and the rule ----------------------------------

def load_error(text: str, tmp_path: Path) -> str:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(ClickscoreError) as info:
        load_rules(path)
    return str(info.value)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_bad_threshold_type_names_line(tmp_path):
    text = high_intent() + "\n" + abandonment(fire_below="low")
    message = load_error(text, tmp_path)
    assert f"rules.toml:{line_of(text, 'fire_below')}:" in message
    assert "rule 'ab'" in message and "fire_below" in message and "'low'" in message


def test_threshold_out_of_range(tmp_path):
    text = high_intent(fire_above=1.5)
    message = load_error(text, tmp_path)
    assert f":{line_of(text, 'fire_above')}:" in message and "[0, 1]" in message


def test_unknown_key_names_line(tmp_path):
    text = high_intent() + "\n" + abandonment() + "fire_abuv = 0.2\n"
    message = load_error(text, tmp_path)
    assert f"rules.toml:{line_of(text, 'fire_abuv')}:" in message
    assert "rule 'ab'" in message and "unknown key 'fire_abuv'" in message


def test_key_of_the_other_kind_is_unknown(tmp_path):
    text = high_intent() + "armed_above = 0.5\n"
    message = load_error(text, tmp_path)
    assert f":{line_of(text, 'armed_above')}:" in message and "kind high_intent" in message


def test_fire_not_above_rearm_names_line(tmp_path):
    text = abandonment() + "\n" + high_intent(fire_above=0.4, rearm_below=0.5)
    message = load_error(text, tmp_path)
    assert f"rules.toml:{line_of(text, 'fire_above')}:" in message
    assert "rule 'hi'" in message and "greater than `rearm_below`" in message
    equal = high_intent(fire_above=0.5, rearm_below=0.5)
    assert f":{line_of(equal, 'fire_above')}:" in load_error(equal, tmp_path)
    inverted = abandonment(fire_below=0.6, armed_above=0.5)
    assert "less than `armed_above`" in load_error(inverted, tmp_path)


def test_duplicate_name_names_second_line(tmp_path):
    text = high_intent() + "\n" + high_intent()
    message = load_error(text, tmp_path)
    second = [i for i, line in enumerate(text.splitlines(), 1) if line.startswith("name")][1]
    assert f"rules.toml:{second}:" in message and "duplicate rule name (first defined at line 2)" in message


def test_other_load_errors(tmp_path):
    assert "missing `rearm_below`" in load_error(
        '[[rule]]\nname = "x"\nkind = "high_intent"\nfire_above = 0.6\n', tmp_path)
    message = load_error('[[rule]]\nname = "x"\nkind = "vip"\n', tmp_path)
    assert "rules.toml:3:" in message and "`kind` must be one of" in message
    message = load_error(high_intent(require_no_cart="yes"), tmp_path)
    assert "must be true or false" in message
    message = load_error(high_intent(require_cart=True, require_no_cart=True), tmp_path)
    assert "cannot both be true" in message
    message = load_error(high_intent(cooldown_s=-1), tmp_path)
    assert f":{line_of(high_intent(cooldown_s=-1), 'cooldown_s')}:" in message
    assert "rules.toml:1:" in load_error('threshold = 0.5\n' + high_intent(), tmp_path)
    assert "not valid TOML" in load_error("[[rule]\nname=", tmp_path)
    assert "one or more [[rule]]" in load_error("", tmp_path)
    with pytest.raises(ClickscoreError, match="rules file"):
        load_rules(tmp_path / "missing.toml")
