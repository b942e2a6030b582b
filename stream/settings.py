"""One frozen settings object for everything that runs against Kafka.

Every field is a CLI flag of the subcommands that use it, and each flag falls back to
an environment variable (`CLICKSCORE_<FIELD>` upper-cased), shown in `--help`:
explicit flag > environment > default. Nothing deeper in the code reads the
environment: it receives a Settings.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable, Iterable

ENV_PREFIX = "CLICKSCORE_"
DEFAULT_BROKER_PORT = 19092
DEFAULT_BROKER = f"127.0.0.1:{DEFAULT_BROKER_PORT}"


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _setting(default: Any, help: str, *, type: Callable | None = None,
             choices: Iterable | None = None) -> Any:
    return field(default=default, metadata={"help": help, "type": type, "choices": choices})


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def number(kind: Callable = float, *, minimum: float = 0, strict: bool = False,
           what: str = "a number") -> Callable[[str], Any]:
    """An argparse type for a finite number >= minimum (> minimum when strict)."""
    bound = f"{'>' if strict else '>='} {minimum:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} {bound}, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what} {bound}, got {text!r}")
        return value
    return parse


_positive_int = number(int, minimum=0, strict=True, what="a whole number")
_non_negative_float = number(float, what="a number")


@dataclass(frozen=True)
class Settings:
    # -- Kafka connection (same flags for the embedded broker and real Kafka) -----------
    broker: str = _setting(DEFAULT_BROKER, "Kafka bootstrap servers, host:port[,host:port]")
    security_protocol: str = _setting(
        "PLAINTEXT", "Kafka security protocol",
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"))
    sasl_mechanism: str = _setting("", "SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)")
    sasl_username: str = _setting("", "SASL username")
    sasl_password: str = _setting("", "SASL password")
    ssl_cafile: str = _setting("", "CA bundle for TLS")
    compression_type: str = _setting(
        "none", "compression of the batches this command produces (every codec is read either way)",
        choices=("none", "gzip", "snappy", "lz4", "zstd"))
    # -- topics ----------------------------------------------------------------------
    input_topic: str = _setting("clicks", "topic of incoming click events")
    scores_topic: str = _setting("buyer-scores", "topic for buyer-probability events")
    next_items_topic: str = _setting("next-items", "topic for next-item events")
    dlq_topic: str = _setting("clicks-dlq", "dead-letter topic for malformed events")
    triggers_topic: str = _setting("triggers", "topic for marketing-trigger events")
    partitions: int = _setting(4, "partitions when the worker creates its topics", type=_positive_int)
    # -- worker ----------------------------------------------------------------------
    app_id: str = _setting("clickscore", "Faust app id (consumer group and changelog prefix)")
    model: str = _setting("onnx_models/default", "exported model folder")
    top_k: int = _setting(20, "next items emitted per event", type=_positive_int)
    batch_size: int = _setting(256, "largest micro-batch of events scored in one model call",
                               type=_positive_int)
    batch_wait_s: float = _setting(0.01, "longest wait to fill a micro-batch, seconds",
                                   type=_non_negative_float)
    # stream/app.py take_batches. 0 (each batch goes as soon as nothing more is fetched) lost
    # to 0.01 at 200 events/s (5 ms fetch wait, loaded 2-core machine): p50 85-116 vs 31-64 ms, as
    # more, smaller batches kept the event loop busier (docs/operations.md).
    batch_linger_s: float = _setting(0.01, "wait this long after a batch's first event for more, even when "
                                     "nothing more is fetched, seconds (0: send at once)",
                                     type=_non_negative_float)
    session_timeout_s: float = _setting(1800.0, "evict sessions idle this long (event time), seconds",
                                        type=_non_negative_float)
    max_message_bytes: int = _setting(16384, "larger input messages are dead-lettered",
                                      type=_positive_int)
    store: str = _setting("memory://", "table store: memory:// or rocksdb:// (needs rocksdict)")
    data_dir: str = _setting("", "Faust data directory (default: a folder per app id in the temp dir)")
    web_port: int = _setting(6066, "Faust web server port (distinct per worker on one machine)",
                             type=_positive_int)
    metrics_port: int = _setting(9464, "Prometheus metrics port (distinct per worker on one machine; 0: off)",
                                 type=int)
    metrics_host: str = _setting("127.0.0.1", "Prometheus metrics bind address")
    execution_provider: str = _setting("auto", "onnxruntime provider", choices=("auto", "cuda", "cpu"))
    rules: str = _setting("", "marketing trigger rules file (TOML); empty: no triggers")
    # Consumer-group timing: the Kafka defaults make a worker wait ~30 s to join.
    session_timeout_ms: int = _setting(10000, "consumer group session timeout, ms", type=_positive_int)
    heartbeat_interval_ms: int = _setting(1000, "consumer heartbeat interval, ms", type=_positive_int)
    rebalance_timeout_ms: int = _setting(10000, "consumer group rebalance timeout, ms", type=_positive_int)
    # Faust hard-codes 1500 ms. The embedded broker holds a fetch for the whole wait even
    # when records arrive meanwhile, which put ~0.6 s into every event's latency. 5 ms
    # cut p50 at 200 events/s by ~25 ms, but at 400/s on a loaded machine (and at half
    # the maximum on a quiet one with 10 ms) the worker fell behind, and an idle worker
    # burns 10% of a core polling: 100 stays (docs/operations.md, "Where the latency goes").
    fetch_max_wait_ms: int = _setting(100, "longest time the broker may hold a fetch request, ms",
                                      type=_positive_int)
    # Faust's default is 0: every output and changelog write goes in a produce request of
    # its own making, and those requests were 19% of the saturated event loop (py-spy).
    # 5 ms: 2,966 against 2,785 events/s saturated (mean of five alternating pairs, the
    # worker/pass-through ratio up in all five) and a lower p50 at half the maximum; at
    # 200 events/s the `deliver` stage grows by the 5 ms (docs/operations.md, "2026-12-04").
    producer_linger_ms: int = _setting(5, "longest time an output waits to share a produce request "
                                       "with others, ms (0: send at once; lowest latency at low rates)",
                                       type=number(int, what="a whole number"))
    log_level: str = _setting("info", "log level", choices=("debug", "info", "warning", "error"))
    # stream/kafka_compat.py batch_sender. On: 18% less event-loop CPU per event (367 vs 448 us,
    # bench.stream, five alternating pairs on the loaded 2-core machine; docs/operations.md,
    # "Where the latency goes"). It was off for a day: a rebalance test dead-lettered 4
    # re-delivered events with it on; the cause was the in-order guard seeking to offset 0
    # before Faust knew the committed offsets (stream/offsets.py UNKNOWN), not the sends.
    batch_sends: bool = _setting(True, "send a micro-batch's outputs as one producer batch per "
                                 "topic-partition (false: one send per output)")
    # -- model-state cache and registry (stream/model_cache.py, stream/registry.py) ----------
    model_cache_bytes: int = _setting(256 << 20, "bytes of per-session model state kept in memory for "
                                      "step scoring (least recently used out; 0: off, every event re-runs "
                                      "its window)", type=number(int, what="a whole number"))
    # One: onnxruntime's default (a thread per core, spinning between calls) took the CPU the
    # event loop needs; bench.stream on 2 cores, same load: 1,410-1,608 events/s with 1 vs 610.
    inference_threads: int = _setting(1, "onnxruntime intra-op threads of the worker's model (0: "
                                      "onnxruntime's default, one per core)", type=number(int, what="a whole number"))
    # stream/inference.py. Off: on 2 cores it did not raise the rate (the event loop, not the
    # model, bounds the worker; docs/operations.md, "2026-12-04").
    inference_process: bool = _setting(False, "score in a child process of its own (its own GIL) "
                                       "instead of a thread of the worker's process")
    # stream/processes.py. One process is bound by its GIL-held Python per event, not by the
    # machine (docs/operations.md): a second process in the same group is the way past it.
    processes: int = _setting(1, "worker processes on this machine in one consumer group, each "
                              "with its own GIL and a share of the partitions; process i serves on "
                              "web port +i, metrics port +i and data dir DATA_DIR/process-i",
                              type=_positive_int)
    model_poll_s: float = _setting(10.0, "seconds between checks of a model registry (--model "
                                   "onnx_models/NAME) for a new version (0: never)", type=_non_negative_float)

    def faust_data_dir(self) -> str:
        """--data-dir, or a folder per app id in the temp dir (the worker's and
        `worker --processes N`'s one default)."""
        import tempfile
        return self.data_dir or os.path.join(tempfile.gettempdir(), f"clickscore-{self.app_id}")

    def kafka_security(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python/aiokafka clients (SASL/TLS passed through)."""
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            kwargs.update(sasl_mechanism=self.sasl_mechanism,
                          sasl_plain_username=self.sasl_username,
                          sasl_plain_password=self.sasl_password)
        if self.ssl_cafile:
            kwargs["ssl_cafile"] = self.ssl_cafile
        return kwargs

    def with_(self, **changes: Any) -> "Settings":
        return replace(self, **changes)


SETTING_FIELDS = {f.name: f for f in fields(Settings)}
KAFKA_SETTINGS = ("broker", "security_protocol", "sasl_mechanism", "sasl_username",
                  "sasl_password", "ssl_cafile")


def add_env_option(parser: argparse.ArgumentParser, flag: str, env: str, *, default: Any = None,
                   help: str = "", type: Callable | None = None, required: bool = False,
                   **kwargs: Any) -> None:
    """An option that falls back to an environment variable, shown in --help.

    The environment value goes through the same `type` as the flag, so a bad value
    in either place fails at once with argparse's message.
    """
    env_value = os.environ.get(env)
    if env_value is not None:
        default = env_value   # argparse applies `type` to string defaults
        required = False
    shown = f" (default: {default})" if default not in (None, "") and env_value is None else ""
    parser.add_argument(flag, default=default, type=type, required=required,
                        help=f"{help}{shown} [env: {env}]", **kwargs)


def add_settings(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Expose the named Settings fields as flags on a subcommand."""
    for name in names:
        f = SETTING_FIELDS[name]
        meta = f.metadata
        kind = meta["type"] or (str if f.type in ("str", str) else None)
        if f.type in ("int", int) and meta["type"] is None:
            kind = int
        if f.type in ("float", float) and meta["type"] is None:
            kind = float
        if f.type in ("bool", bool):
            kind = _bool
        add_env_option(parser, "--" + name.replace("_", "-"), env_name(name),
                       default=f.default if f.default is not MISSING else None,
                       help=meta["help"], type=kind, choices=meta["choices"])


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from parsed flags; fields a subcommand does not expose keep env/default."""
    values: dict[str, Any] = {}
    for name, f in SETTING_FIELDS.items():
        if hasattr(args, name):
            values[name] = getattr(args, name)
        elif env_name(name) in os.environ:
            raw = os.environ[env_name(name)]
            conv = f.metadata["type"] or {"int": int, "float": float}.get(str(f.type), str)
            try:
                values[name] = conv(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise SystemExit(f"clickscore: environment {env_name(name)}={raw!r}: {exc}") from None
    return Settings(**values)
