"""One CLI: every configuration flag falls back to an environment variable shown in --help."""
import os
import subprocess
import sys
from pathlib import Path


from stream.cli import COMMANDS, build_parser
from stream.settings import Settings, env_name, settings_from_args

CLI = str(Path(sys.executable).parent / "clickscore")


def test_every_option_of_every_subcommand_names_its_env_var():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, subparser in sub.choices.items():
        for action in subparser._actions:
            if action.option_strings and action.dest != "help":
                assert "[env: CLICKSCORE_" in (action.help or ""), f"{name} {action.option_strings}"


def test_flag_beats_environment_beats_default(monkeypatch):
    monkeypatch.setenv(env_name("top_k"), "7")
    monkeypatch.setenv(env_name("broker"), "kafka:9092")
    args = build_parser().parse_args(["worker", "--broker", "other:1"])
    settings = settings_from_args(args)
    assert settings.broker == "other:1" and settings.top_k == 7
    assert settings.batch_size == Settings().batch_size


def test_bad_environment_value_fails_at_once_with_its_name():
    env = dict(os.environ, CLICKSCORE_TOP_K="-3")
    proc = subprocess.run([CLI, "worker"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--top-k" in proc.stderr and "a whole number > 0" in proc.stderr


def test_help_lists_subcommands_without_importing_torch():
    code = ("import sys; from stream.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    proc = subprocess.run([CLI, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in COMMANDS:
        assert name in proc.stdout


def test_unknown_subcommand_is_a_usage_error():
    proc = subprocess.run([CLI, "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
