"""`clickscore`: the one command-line entry point.

    clickscore prepare --dataset yoochoose --input DIR --out data/yoochoose
    clickscore simulate --sessions 5000 --seed 1 --out data/sim.parquet
    clickscore --help / clickscore SUBCOMMAND --help

Each subcommand's arguments are declared here (so `--help` needs no heavy import),
and its implementation module is imported only when it runs: the worker never
imports torch, and `--help` starts fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from stream.errors import ClickscoreError
from stream.settings import KAFKA_SETTINGS, add_env_option, add_settings

DATASETS = ("retailrocket", "yoochoose", "diginetica", "taobao", "rees46", "otto", "canonical")


def _prepare(p: argparse.ArgumentParser) -> None:
    add_env_option(p, "--dataset", "CLICKSCORE_DATASET", choices=DATASETS, required=True,
                   help="input format")
    add_env_option(p, "--input", "CLICKSCORE_INPUT", required=True,
                   help="dataset file or folder as distributed (see README: Data)")
    add_env_option(p, "--out", "CLICKSCORE_OUT", required=True, help="output folder")
    add_env_option(p, "--test-days", "CLICKSCORE_TEST_DAYS", type=float,
                   help="test = sessions starting in the last N days "
                        "(default: 1 for yoochoose, 7 otherwise)")
    add_env_option(p, "--valid-days", "CLICKSCORE_VALID_DAYS", type=float,
                   help="validation = sessions starting in the N days before test (default: as --test-days)")
    add_env_option(p, "--session-gap-minutes", "CLICKSCORE_SESSION_GAP_MINUTES", type=float, default=30.0,
                   help="inactivity gap that starts a new session, for logs without session ids")


def _simulate(p: argparse.ArgumentParser) -> None:
    add_env_option(p, "--sessions", "CLICKSCORE_SESSIONS", type=int, default=10000,
                   help="number of sessions")
    add_env_option(p, "--seed", "CLICKSCORE_SEED", type=int, default=0, help="random seed")
    add_env_option(p, "--out", "CLICKSCORE_OUT", required=True,
                   help="output file (.parquet, .csv or .jsonl)")
    add_env_option(p, "--buy-share", "CLICKSCORE_BUY_SHARE", type=float, default=0.05,
                   help="share of sessions that buy")
    add_env_option(p, "--items", "CLICKSCORE_ITEMS", type=int, default=5000, help="catalogue size")
    add_env_option(p, "--categories", "CLICKSCORE_CATEGORIES", type=int, default=50,
                   help="number of categories")
    add_env_option(p, "--start", "CLICKSCORE_START", default="2026-01-05T00:00:00Z",
                   help="ISO-8601 time of the first session")
    add_env_option(p, "--days", "CLICKSCORE_DAYS", type=float, default=14.0,
                   help="days the sessions are spread over")


def _broker(p: argparse.ArgumentParser) -> None:
    add_env_option(p, "--port", "CLICKSCORE_BROKER_PORT", type=int, default=None,
                   help="loopback port (default: the port of --broker)")
    add_settings(p, ["broker"])


def _worker(p: argparse.ArgumentParser) -> None:
    add_settings(p, KAFKA_SETTINGS + (
        "model", "input_topic", "scores_topic", "next_items_topic", "dlq_topic", "triggers_topic",
        "partitions", "app_id", "top_k", "batch_size", "batch_wait_s", "session_timeout_s",
        "max_message_bytes", "store", "data_dir", "web_port", "metrics_port", "metrics_host",
        "execution_provider", "rules", "session_timeout_ms", "heartbeat_interval_ms",
        "rebalance_timeout_ms", "log_level"))


# name -> (help, argument builder, "module:function" run with the parsed args)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "prepare": ("read a public click log into the canonical format, split and describe it",
                _prepare, "training.prepare:run"),
    "simulate": ("generate a synthetic click log in the canonical format",
                 _simulate, "training.simulate:run"),
    "broker": ("run the embedded Kafka-compatible broker (Tansu) on loopback",
               _broker, "stream.broker:run"),
    "worker": ("run the streaming scorer (Faust worker)", _worker, "stream.app:run"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clickscore",
        description="Real-time buyer-intent scoring for online shops. "
                    "Every option falls back to the environment variable shown beside it.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module_name, func_name = COMMANDS[args.command][2].split(":")
    run = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(run(args) or 0)
    except ClickscoreError as exc:
        print(f"clickscore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
