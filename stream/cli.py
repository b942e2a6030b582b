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
    add_env_option(p, "--buys", "CLICKSCORE_BUYS", default="",
                   help="yoochoose: buys file to join onto the clicks (default: yoochoose-buys.dat "
                        "beside them, if any); buys of sessions without clicks are counted and left out")
    add_env_option(p, "--complete-buys-below", "CLICKSCORE_COMPLETE_BUYS_BELOW", type=int, default=None,
                   help="yoochoose: keep only sessions with id below N, where the buys file is complete "
                        "(22000 for the shared buys head; docs/data.md)")
    add_env_option(p, "--split", "CLICKSCORE_SPLIT", choices=("auto", "random"), default="auto",
                   help="auto: the published split, else temporal; random: seeded random split by "
                        "session (short logs, e.g. the REES46 head)")
    add_env_option(p, "--split-seed", "CLICKSCORE_SPLIT_SEED", type=int, default=0,
                   help="seed of --split random")
    add_env_option(p, "--random-split-share", "CLICKSCORE_RANDOM_SPLIT_SHARE", type=float, default=0.2,
                   help="--split random: share of sessions in test, and again in valid")


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
                   help="ISO-8601 start of the period sessions are spread over")
    add_env_option(p, "--days", "CLICKSCORE_DAYS", type=float, default=14.0,
                   help="days the sessions are spread over")


def _train(p: argparse.ArgumentParser) -> None:
    # Env names carry TRAIN_ so they never collide with the worker's CLICKSCORE_MODEL,
    # CLICKSCORE_BATCH_SIZE or prepare's CLICKSCORE_OUT.
    add_env_option(p, "--data", "CLICKSCORE_TRAIN_DATA", required=True,
                   help="prepared folder (clickscore prepare --out)")
    add_env_option(p, "--model", "CLICKSCORE_TRAIN_MODEL", choices=("gru", "dilated"), default="gru",
                   help="model family")
    add_env_option(p, "--out", "CLICKSCORE_TRAIN_OUT", required=True, help="checkpoint folder")
    add_env_option(p, "--epochs", "CLICKSCORE_TRAIN_EPOCHS", type=int, default=None,
                   help="most epochs (default 40, early stopping on valid); with --fit-on train+valid: "
                        "exactly N (default: picked by an early-stopped --fit-on train run first)")
    add_env_option(p, "--batch-size", "CLICKSCORE_TRAIN_BATCH_SIZE", type=int, default=64,
                   help="windows per step")
    add_env_option(p, "--lr", "CLICKSCORE_TRAIN_LR", type=float, default=1e-3, help="AdamW learning rate")
    add_env_option(p, "--weight-decay", "CLICKSCORE_TRAIN_WEIGHT_DECAY", type=float, default=1e-4,
                   help="AdamW weight decay")
    add_env_option(p, "--clip", "CLICKSCORE_TRAIN_CLIP", type=float, default=1.0, help="gradient-norm clip")
    add_env_option(p, "--max-steps", "CLICKSCORE_TRAIN_MAX_STEPS", type=int, default=0,
                   help="stop after this many optimiser steps in all (0: no limit; for tests)")
    add_env_option(p, "--patience", "CLICKSCORE_TRAIN_PATIENCE", type=int, default=3,
                   help="early stopping: epochs without a better validation score "
                        "(mean of buy ROC AUC and next-item Recall@20); 0: off")
    add_env_option(p, "--imbalance", "CLICKSCORE_TRAIN_IMBALANCE", default="none",
                   choices=("weight", "undersample", "oversample", "none"),
                   help="buy-class imbalance handling (see training/train.py for the measurements)")
    add_env_option(p, "--buy-loss-weight", "CLICKSCORE_TRAIN_BUY_LOSS_WEIGHT", type=float, default=1.0,
                   help="weight of the buy loss beside the next-item loss")
    add_env_option(p, "--seed", "CLICKSCORE_TRAIN_SEED", type=int, default=0,
                   help="random seed (same seed, same weights on CPU)")
    add_env_option(p, "--device", "CLICKSCORE_TRAIN_DEVICE", choices=("auto", "cpu", "cuda"), default="auto",
                   help="torch device (auto: CUDA when present)")
    add_env_option(p, "--threads", "CLICKSCORE_TRAIN_THREADS", type=int, default=0,
                   help="torch CPU threads (0: torch's default)")
    add_env_option(p, "--embedding-dim", "CLICKSCORE_TRAIN_EMBEDDING_DIM", type=int, default=64,
                   help="item embedding width (the projected input width)")
    add_env_option(p, "--hidden-dim", "CLICKSCORE_TRAIN_HIDDEN_DIM", type=int, default=96,
                   help="GRU state / convolution channels")
    add_env_option(p, "--dropout", "CLICKSCORE_TRAIN_DROPOUT", type=float, default=0.1, help="dropout")
    add_env_option(p, "--min-item-count", "CLICKSCORE_TRAIN_MIN_ITEM_COUNT", type=int, default=1,
                   help="items seen fewer times in train map to out-of-vocabulary")
    add_env_option(p, "--fit-on", "CLICKSCORE_TRAIN_FIT_ON", choices=("train", "train+valid"), default="train",
                   help="splits to fit vocabularies and weights on; train+valid (like the baselines) has "
                        "no held-out data: it first runs --fit-on train into OUT/held-out to pick the epoch "
                        "count, calibration and blend on valid, then refits (or give --epochs N)")
    add_env_option(p, "--max-valid-windows", "CLICKSCORE_TRAIN_MAX_VALID_WINDOWS", type=int, default=20000,
                   help="validate on at most this many windows (a fixed random subset)")
    from stream.settings import _bool
    add_env_option(p, "--select-on", "CLICKSCORE_TRAIN_SELECT_ON", default="score",
                   choices=("score", "buy_auc", "recall", "mrr"),
                   help="valid figure that picks the epoch kept and drives early stopping "
                        "(score = mean of buy ROC AUC and next-item Recall@20)")
    add_env_option(p, "--repeat", "CLICKSCORE_TRAIN_REPEAT", type=_bool, nargs="?", const=True, default=True,
                   help="gru: gated copy distribution over the items already in the window (RepeatNet-style)")
    add_env_option(p, "--repeat-mode", "CLICKSCORE_TRAIN_REPEAT_MODE", choices=("mixture", "bonus"),
                   default="mixture", help="gru --repeat: mixture = RepeatNet gate between a copy and a "
                   "catalogue distribution; bonus = learned recency bonus added to the window items' logits")
    add_env_option(p, "--explore-loss-weight", "CLICKSCORE_TRAIN_EXPLORE_LOSS_WEIGHT", type=float, default=1.0,
                   help="gru --repeat: weight of an extra cross-entropy on the catalogue logits alone")
    add_env_option(p, "--wide", "CLICKSCORE_TRAIN_WIDE", type=_bool, nargs="?", const=True, default=True,
                   help="gru: session aggregates and pooled states beside the last state in the buy head")
    add_env_option(p, "--calibrate", "CLICKSCORE_TRAIN_CALIBRATE", type=_bool, nargs="?", const=True,
                   default=True, help="fit Platt scaling of the buy head on valid and bake it into the model")
    add_env_option(p, "--stack-gbm", "CLICKSCORE_TRAIN_STACK_GBM", type=_bool, nargs="?", const=True,
                   default=True, help="gru: after training, fit the aggregate LightGBM on in-graph session "
                   "features (train, tuned on valid) and blend it with the buy logit on valid, inside the "
                   "exported graphs (training/models/stack.py; its feature variant chosen on valid; with "
                   "--fit-on train+valid the blend intercept is refitted on out-of-fold scores); false = the "
                   "GRU's own buy head")
    add_env_option(p, "--neighbours", "CLICKSCORE_TRAIN_NEIGHBOURS", type=_bool, nargs="?", const=True,
                   default=True, help="gru (with --repeat or --wide): mix the next-item head with an item-neighbour "
                   "table fitted on the training sessions, shipped inside the graphs (training/models/neighbours.py)")
    add_env_option(p, "--neighbour-top-n", "CLICKSCORE_TRAIN_NEIGHBOUR_TOP_N", type=int, default=100,
                   help="--neighbours: co-occurring items kept per item (N * 8 bytes per item in the model)")
    add_env_option(p, "--neighbour-window", "CLICKSCORE_TRAIN_NEIGHBOUR_WINDOW", type=int, default=10,
                   help="--neighbours: the session's last K items whose neighbours are summed")
    add_env_option(p, "--neighbour-decay", "CLICKSCORE_TRAIN_NEIGHBOUR_DECAY", type=float, default=2.0,
                   help="--neighbours: an item k steps back weighs exp(-k / decay)")
    add_env_option(p, "--neighbour-steps", "CLICKSCORE_TRAIN_NEIGHBOUR_STEPS", type=int, default=10,
                   help="--neighbours: largest in-session distance that makes two items neighbours (weight 1/d)")
    add_env_option(p, "--neighbour-backward", "CLICKSCORE_TRAIN_NEIGHBOUR_BACKWARD", type=float, default=0.5,
                   help="--neighbours: weight of b before a, relative to b after a")
    add_env_option(p, "--neighbour-recency-days", "CLICKSCORE_TRAIN_NEIGHBOUR_RECENCY_DAYS", type=float,
                   default=0.0, help="--neighbours: session weight exp(-age / days) from the last training "
                   "event (0: off)")
    add_env_option(p, "--neighbour-idf", "CLICKSCORE_TRAIN_NEIGHBOUR_IDF", type=float, default=1.0,
                   help="--neighbours: target weight 1 + idf * log(sessions / events of the target) (0: off)")
    add_env_option(p, "--neighbour-mode", "CLICKSCORE_TRAIN_NEIGHBOUR_MODE", choices=("explore", "output"),
                   default="explore", help="--neighbours: explore = mix into the catalogue side of the repeat "
                   "gate (with --repeat-mode mixture); output = mix with the final next-item distribution")
    add_env_option(p, "--neighbour-mix", "CLICKSCORE_TRAIN_NEIGHBOUR_MIX", type=float, default=-1.0,
                   help="--neighbours: weight a of p = (1 - a) p_model + a p_knn; -1: fit on valid after "
                   "training (--fit-on train+valid: the held-out stage's fit; with --epochs N nothing is held out: 0.4, "
                   "or pass the value a --fit-on train run chose)")
    add_env_option(p, "--session-neighbours", "CLICKSCORE_TRAIN_SESSION_NEIGHBOURS", type=_bool, nargs="?",
                   const=True, default=True, help="gru (with --repeat or --wide): mix the next-item output with "
                   "VSTAN's session neighbourhood (posting lists of training sessions inside the graphs; "
                   "training/models/sessions.py); false = off")
    add_env_option(p, "--session-k", "CLICKSCORE_TRAIN_SESSION_K", type=int, default=500,
                   help="--session-neighbours: most similar training sessions that score items")
    add_env_option(p, "--session-posting", "CLICKSCORE_TRAIN_SESSION_POSTING", type=int, default=500,
                   help="--session-neighbours: most recent training sessions kept per item (P * 4 bytes per item)")
    add_env_option(p, "--session-length", "CLICKSCORE_TRAIN_SESSION_LENGTH", type=int, default=20,
                   help="--session-neighbours: most recent distinct items kept per training session "
                   "(L * 8 bytes per session)")
    add_env_option(p, "--session-window", "CLICKSCORE_TRAIN_SESSION_WINDOW", type=int, default=10,
                   help="--session-neighbours: the session's last K items (1..24) that find neighbours")
    add_env_option(p, "--session-recency-days", "CLICKSCORE_TRAIN_SESSION_RECENCY_DAYS", type=float, default=5.0,
                   help="--session-neighbours: a training session weighs exp(-age / days) (0: off)")
    add_env_option(p, "--session-idf", "CLICKSCORE_TRAIN_SESSION_IDF", type=float, default=2.0,
                   help="--session-neighbours: item weight 1 + idf * log(sessions / events of the item) (0: off)")
    add_env_option(p, "--session-max-sessions", "CLICKSCORE_TRAIN_SESSION_MAX_SESSIONS", type=int, default=50_000,
                   help="--session-neighbours: most recent training sessions indexed (0: all; L * 8 + 4 bytes each)")
    add_env_option(p, "--session-mix", "CLICKSCORE_TRAIN_SESSION_MIX", type=float, default=-1.0,
                   help="--session-neighbours: weight b of p = (1 - b) p_model + b p_sess; -1: fit on valid after "
                   "training (--fit-on train+valid: the held-out stage's fit; with --epochs N: 0.3)")


def _tune(p: argparse.ArgumentParser) -> None:
    add_env_option(p, "--data", "CLICKSCORE_TUNE_DATA", required=True,
                   help="prepared folder; only its train and valid rows are read")
    add_env_option(p, "--model", "CLICKSCORE_TUNE_MODEL", choices=("gru", "dilated"), default="gru",
                   help="model family")
    add_env_option(p, "--out", "CLICKSCORE_TUNE_OUT", required=True,
                   help="folder for the trials log (trials.json, trials.csv, best.json) and trial runs")
    add_env_option(p, "--trials", "CLICKSCORE_TUNE_TRIALS", type=int, default=20, help="Optuna trials")
    add_env_option(p, "--timeout", "CLICKSCORE_TUNE_TIMEOUT", type=float, default=0,
                   help="stop starting trials after this many seconds (0: no limit)")
    add_env_option(p, "--objective", "CLICKSCORE_TUNE_OBJECTIVE", default="score",
                   choices=("score", "recall", "mrr", "buy_auc"),
                   help="valid figure maximised (score = train's early-stopping score)")
    add_env_option(p, "--epochs", "CLICKSCORE_TUNE_EPOCHS", type=int, default=40, help="most epochs per trial")
    add_env_option(p, "--patience", "CLICKSCORE_TUNE_PATIENCE", type=int, default=3,
                   help="early stopping patience per trial")
    add_env_option(p, "--max-steps", "CLICKSCORE_TUNE_MAX_STEPS", type=int, default=0,
                   help="optimiser steps per trial (0: no limit; for tests)")
    add_env_option(p, "--threads", "CLICKSCORE_TUNE_THREADS", type=int, default=1, help="torch CPU threads")
    add_env_option(p, "--seed", "CLICKSCORE_TUNE_SEED", type=int, default=0,
                   help="seed of the sampler and of every trial")
    from stream.settings import _bool
    add_env_option(p, "--start-from-defaults", "CLICKSCORE_TUNE_START_FROM_DEFAULTS", type=_bool, nargs="?",
                   const=True, default=True, help="trial 0 is the project's default configuration")
    add_env_option(p, "--keep-checkpoints", "CLICKSCORE_TUNE_KEEP_CHECKPOINTS", type=_bool, nargs="?",
                   const=True, default=False, help="keep every trial's checkpoint folder")


def _export(p: argparse.ArgumentParser) -> None:
    add_env_option(p, "--checkpoint", "CLICKSCORE_EXPORT_CHECKPOINT", required=True,
                   help="checkpoint folder (clickscore train --out)")
    add_env_option(p, "--out", "CLICKSCORE_EXPORT_OUT", required=True,
                   help="model folder to write, e.g. onnx_models/NAME")
    add_env_option(p, "--name", "CLICKSCORE_EXPORT_NAME", help="model name (default: the --out folder's name)")
    add_env_option(p, "--model-version", "CLICKSCORE_EXPORT_MODEL_VERSION", default="1", help="model version")
    _switch(p, "--registry", "CLICKSCORE_EXPORT_REGISTRY",
            "--out is a model registry (onnx_models/NAME): write its next VERSION folder, numbered "
            "1, 2, ... (--model-version is then that number); also when --out already holds versions")
    add_env_option(p, "--opset", "CLICKSCORE_EXPORT_OPSET", type=int, default=17, help="ONNX opset (>= 17)")
    add_env_option(p, "--tolerance", "CLICKSCORE_EXPORT_TOLERANCE", type=float, default=1e-5,
                   help="largest allowed |PyTorch - onnxruntime| difference in the parity check")
    add_env_option(p, "--data-command", "CLICKSCORE_EXPORT_DATA_COMMAND",
                   help="what made the data before `clickscore prepare` (e.g. the `clickscore "
                        "simulate` line; several joined by ' && '), listed in the model card")


def _evaluate(p: argparse.ArgumentParser) -> None:
    from stream.settings import _bool
    # Env names carry EVAL_ so they never collide with the worker's CLICKSCORE_MODEL.
    add_env_option(p, "--model", "CLICKSCORE_EVAL_MODEL", required=True,
                   help="exported model folder (model.onnx) or training checkpoint folder (checkpoint.pt)")
    add_env_option(p, "--data", "CLICKSCORE_EVAL_DATA", required=True,
                   help="prepared folder (clickscore prepare --out) of the dataset the model was trained on")
    add_env_option(p, "--split", "CLICKSCORE_EVAL_SPLIT", default="test", choices=("test", "valid"),
                   help="split to evaluate on")
    add_env_option(p, "--json", "CLICKSCORE_EVAL_JSON", type=_bool, nargs="?", const=True, default=False,
                   help="print the metrics as one JSON object on stdout")
    add_env_option(p, "--report", "CLICKSCORE_EVAL_REPORT", default="",
                   help="also write a Markdown report here (plots as PNGs beside it)")
    add_env_option(p, "--bootstrap", "CLICKSCORE_EVAL_BOOTSTRAP", type=int, default=1000,
                   help="session bootstrap resamples for the 95%% intervals (0: none)")
    add_env_option(p, "--seed", "CLICKSCORE_EVAL_SEED", type=int, default=0,
                   help="seed of the bootstrap and the baselines")
    add_env_option(p, "--baselines", "CLICKSCORE_EVAL_BASELINES", type=_bool, nargs="?", const=True,
                   default=True, help="also fit and score the baselines (--baselines false: off)")
    add_env_option(p, "--baseline-train", "CLICKSCORE_EVAL_BASELINE_TRAIN", default="train+valid",
                   choices=("train+valid", "train"),
                   help="splits the baselines are fitted on (valid is added only when evaluating test)")
    add_env_option(p, "--threads", "CLICKSCORE_EVAL_THREADS", type=int, default=0,
                   help="onnxruntime/torch CPU threads (0: their default)")
    add_env_option(p, "--verbose", "CLICKSCORE_EVAL_VERBOSE", type=_bool, nargs="?", const=True,
                   default=False, help="log progress to stderr")


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
        "rebalance_timeout_ms", "fetch_max_wait_ms", "producer_linger_ms", "log_level", "compression_type"))
    add_settings(p, ("model_cache_bytes", "model_poll_s", "inference_threads", "inference_process"))
    add_settings(p, ("batch_linger_s",))
    add_settings(p, ("batch_sends",))
    add_settings(p, ("processes",))


def _models(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="model registry folder (onnx_models/NAME with VERSION subfolders) "
                                "or a single exported model folder")


def _sink(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=("webhook",), help="where triggers go: webhook = HTTP POST")
    add_env_option(p, "--url", "CLICKSCORE_SINK_URL", required=True,
                   help="webhook URL each trigger is POSTed to as JSON")
    add_env_option(p, "--group", "CLICKSCORE_SINK_GROUP", default="clickscore-sink",
                   help="consumer group (offsets are committed only after delivery)")
    add_env_option(p, "--dlq-topic", "CLICKSCORE_SINK_DLQ_TOPIC", default="triggers-dlq",
                   help="dead-letter topic for triggers that could not be delivered")
    add_env_option(p, "--max-attempts", "CLICKSCORE_SINK_MAX_ATTEMPTS", type=int, default=5,
                   help="attempts per trigger before it is dead-lettered")
    add_env_option(p, "--initial-backoff-s", "CLICKSCORE_SINK_INITIAL_BACKOFF_S", type=float,
                   default=0.5, help="wait after the first failed attempt, doubled after each")
    add_env_option(p, "--max-backoff-s", "CLICKSCORE_SINK_MAX_BACKOFF_S", type=float, default=30.0,
                   help="longest wait between attempts")
    add_env_option(p, "--timeout-s", "CLICKSCORE_SINK_TIMEOUT_S", type=float, default=10.0,
                   help="timeout of one HTTP attempt, seconds")
    add_env_option(p, "--concurrency", "CLICKSCORE_SINK_CONCURRENCY", type=int, default=8,
                   help="triggers in flight at once (1 keeps partition order)")
    add_env_option(p, "--metrics-port", "CLICKSCORE_SINK_METRICS_PORT", type=int, default=9466,
                   dest="sink_metrics_port", help="Prometheus metrics port of the sink (-1: off)")
    add_env_option(p, "--max-messages", "CLICKSCORE_SINK_MAX_MESSAGES", type=int, default=0,
                   help="exit after committing this many triggers (0: run until stopped)")
    add_env_option(p, "--idle-exit-s", "CLICKSCORE_SINK_IDLE_EXIT_S", type=float, default=0.0,
                   help="exit after this long without a trigger (0: run until stopped)")
    add_settings(p, KAFKA_SETTINGS + ("triggers_topic", "metrics_host", "session_timeout_ms",
                                      "heartbeat_interval_ms", "rebalance_timeout_ms", "fetch_max_wait_ms", "log_level"))


def _replay(p: argparse.ArgumentParser) -> None:
    from stream.replay import parse_count, parse_gap, parse_rate, parse_speed, parse_time
    from stream.settings import _bool, _positive_int
    add_env_option(p, "--input", "CLICKSCORE_INPUT", required=True,
                   help="click log: a prepared folder, a canonical .parquet/.csv, JSON lines of "
                        "click events (.jsonl), or a public dataset as distributed (with --dataset)")
    add_env_option(p, "--dataset", "CLICKSCORE_DATASET", default="auto",
                   choices=("auto", "prepared", "jsonl") + DATASETS,
                   help="input format; auto detects prepared folders, canonical files and JSON lines")
    add_env_option(p, "--topic", "CLICKSCORE_INPUT_TOPIC", default="clicks", help="topic to produce to")
    add_env_option(p, "--speed", "CLICKSCORE_REPLAY_SPEED", type=parse_speed, default="max",
                   help="1 = real time (event-time gaps reproduced), 60 = sixty times faster, "
                        "max = as fast as the broker takes it")
    add_env_option(p, "--rate", "CLICKSCORE_REPLAY_RATE", type=parse_rate,
                   help="cap on events per second (with any --speed)")
    add_env_option(p, "--max-gap-s", "CLICKSCORE_REPLAY_MAX_GAP_S", type=parse_gap,
                   help="longest pause between two events as replayed, wall seconds "
                        "(default: none, gaps reproduced in full)")
    add_env_option(p, "--restamp", "CLICKSCORE_REPLAY_RESTAMP", type=_bool, nargs="?", const=True,
                   default=False,
                   help="set each event's timestamp to the wall time it is replayed at (gaps as "
                        "replayed: original/speed); default keeps the original event time")
    add_env_option(p, "--from", "CLICKSCORE_REPLAY_FROM", type=parse_time, dest="from_ms",
                   help="first event time to replay, ISO-8601 or epoch ms (inclusive)")
    add_env_option(p, "--to", "CLICKSCORE_REPLAY_TO", type=parse_time, dest="to_ms",
                   help="event time to stop before, ISO-8601 or epoch ms (exclusive)")
    add_env_option(p, "--skip", "CLICKSCORE_REPLAY_SKIP", type=parse_count, default=0,
                   help="skip the first N events of the selection (resume a stopped replay)")
    add_env_option(p, "--limit", "CLICKSCORE_REPLAY_LIMIT", type=parse_count,
                   help="send at most N events")
    add_env_option(p, "--session-gap-minutes", "CLICKSCORE_SESSION_GAP_MINUTES", type=float, default=30.0,
                   help="inactivity gap that starts a new session, for logs without session ids")
    add_env_option(p, "--replication-factor", "CLICKSCORE_REPLAY_REPLICATION_FACTOR", type=_positive_int,
                   default=1, help="replication factor if the topic has to be created")
    add_env_option(p, "--linger-ms", "CLICKSCORE_REPLAY_LINGER_MS", type=parse_count, default=5,
                   help="producer linger.ms: wait this long to fill a batch")
    add_env_option(p, "--producer-batch-bytes", "CLICKSCORE_REPLAY_BATCH_BYTES", type=_positive_int,
                   default=65536, help="producer batch.size in bytes")
    add_env_option(p, "--retries", "CLICKSCORE_REPLAY_RETRIES", type=parse_count, default=5,
                   help="producer retries before a send counts as failed")
    add_env_option(p, "--delivery-timeout-ms", "CLICKSCORE_REPLAY_DELIVERY_TIMEOUT_MS",
                   type=_positive_int, default=30000,
                   help="give up on a send (and report it) after this long")
    add_env_option(p, "--progress", "CLICKSCORE_REPLAY_PROGRESS", type=_bool, nargs="?", const=True,
                   default=True, help="show a progress bar on stderr (--progress false: off)")
    add_env_option(p, "--json", "CLICKSCORE_REPLAY_JSON", type=_bool, nargs="?", const=True,
                   default=False, help="print the summary as one JSON line")
    add_settings(p, KAFKA_SETTINGS + ("partitions", "compression_type"))


def _demo(p: argparse.ArgumentParser) -> None:
    from stream.replay import parse_rate, parse_speed
    from stream.settings import _bool
    add_env_option(p, "--duration", "CLICKSCORE_DEMO_DURATION", type=float, default=60.0,
                   help="seconds of replay before the demo stops by itself")
    add_env_option(p, "--input", "CLICKSCORE_DEMO_INPUT",
                   help="click log to replay (default: `clickscore simulate` output in a temp dir)")
    add_env_option(p, "--dataset", "CLICKSCORE_DEMO_DATASET", default="auto",
                   choices=("auto", "prepared", "jsonl") + DATASETS, help="format of --input")
    add_env_option(p, "--sessions", "CLICKSCORE_DEMO_SESSIONS", type=int, default=1000,
                   help="test sessions of the default model's simulation to replay when no --input is given")
    add_env_option(p, "--seed", "CLICKSCORE_DEMO_SEED", type=int, default=0,
                   help="simulation seed (0 is the default model's; another seed means another catalogue)")
    add_env_option(p, "--rate", "CLICKSCORE_DEMO_RATE", type=parse_rate, default="200",
                   help="replay rate cap, events per second")
    add_env_option(p, "--speed", "CLICKSCORE_DEMO_SPEED", type=parse_speed, default="max",
                   help="replay speed (1 = real time, max = only the --rate cap)")
    add_env_option(p, "--refresh-s", "CLICKSCORE_DEMO_REFRESH_S", type=float, default=1.0,
                   help="seconds between redraws of the live view")
    add_env_option(p, "--view", "CLICKSCORE_DEMO_VIEW", default="auto", choices=("auto", "ansi", "plain"),
                   help="live view: ansi redraw (auto on a terminal) or plain status lines")
    add_env_option(p, "--top", "CLICKSCORE_DEMO_TOP", type=int, default=5,
                   help="sessions shown in the buy-probability ranking")
    add_env_option(p, "--json", "CLICKSCORE_DEMO_JSON", type=_bool, nargs="?", const=True, default=False,
                   help="also print the summary as one JSON line")
    add_settings(p, ("model", "execution_provider", "partitions", "log_level"))


def _switch(p, flag: str, env: str, help: str) -> None:
    """An on/off flag that takes no value (`--follow TOPIC` must not read TOPIC as its
    value), with --no-... to turn off what the environment turned on."""
    import os
    from stream.settings import _bool
    try:
        default = _bool(os.environ.get(env, "false"))
    except argparse.ArgumentTypeError as exc:
        raise SystemExit(f"clickscore: environment {env}: {exc}") from None
    p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f"{help} [env: {env}]")


def _tail(p: argparse.ArgumentParser) -> None:
    from stream.replay import parse_time
    from stream.settings import number
    from stream.tail import parse_partitions
    p.add_argument("topic", help="topic to read, e.g. buyer-scores, next-items, clicks-dlq, triggers, clicks")
    start = p.add_mutually_exclusive_group()
    _switch(start, "--from-end", "CLICKSCORE_TAIL_FROM_END",
            "start at the end: only records that arrive from now on (with --follow)")
    add_env_option(start, "--offset", "CLICKSCORE_TAIL_OFFSET", type=number(int, what="an offset"),
                   help="start at this offset in every partition read")
    add_env_option(p, "--from-time", "CLICKSCORE_TAIL_FROM_TIME", type=parse_time,
                   help="skip records whose record timestamp is earlier (epoch ms or ISO-8601); "
                        "filtered here, because the embedded broker seeks by time wrongly")
    _switch(p, "--follow", "CLICKSCORE_TAIL_FOLLOW",
            "keep waiting for new records (Ctrl-C stops); otherwise exit at the end")
    add_env_option(p, "--partition", "CLICKSCORE_TAIL_PARTITION", type=parse_partitions,
                   help="read only these partitions, e.g. 0 or 0,2 (default: all)")
    add_env_option(p, "--session", "CLICKSCORE_TAIL_SESSION",
                   help="only records of this session (record key or the value's session_id)")
    add_env_option(p, "--limit", "CLICKSCORE_TAIL_LIMIT", type=number(int, what="a count"), default=0,
                   help="exit after this many records (0: no limit)")
    _switch(p, "--json", "CLICKSCORE_TAIL_JSON",
            "JSON lines (partition, offset, timestamp, key, decoded value) instead of aligned text")
    add_settings(p, KAFKA_SETTINGS)


# name -> (help, argument builder, "module:function" run with the parsed args)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {
    "prepare": ("read a public click log into the canonical format, split and describe it",
                _prepare, "training.prepare:run"),
    "simulate": ("generate a synthetic click log in the canonical format",
                 _simulate, "training.simulate:run"),
    "train": ("train a GRU or dilated-convolution session model on a prepared folder",
              _train, "training.train:run"),
    "tune": ("search training hyperparameters on the valid split (Optuna); prints the train+valid command",
             _tune, "training.tune:run"),
    "export": ("export a checkpoint to ONNX with metadata, model card and a parity check",
               _export, "training.export:run"),
    "evaluate": ("offline metrics of a model on a prepared folder, beside popular/SKNN/aggregate baselines",
                 _evaluate, "training.evaluate:run"),
    "broker": ("run the embedded Kafka-compatible broker (Tansu) on loopback",
               _broker, "stream.broker:run"),
    "worker": ("run the streaming scorer (Faust worker)", _worker, "stream.app:run"),
    "sink": ("deliver marketing triggers to a webhook (at least once, dead-letters failures)",
             _sink, "stream.sink:run"),
    "replay": ("replay a click log into a topic in event-time order at a chosen speed",
               _replay, "stream.replay:run"),
    "demo": ("run broker, worker and a replayed log with a live view; print buy AUC and Recall@20",
             _demo, "stream.demo:run"),
    "tail": ("print the records of a topic (scores, next items, dead letters, triggers, any topic)",
             _tail, "stream.tail:run"),
    "models": ("list a model registry's versions, whether each is valid, and which one a worker serves",
               _models, "stream.registry:run"),
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
    if args.command == "worker":   # `worker --processes N` runs the same command line N times
        args.argv = list(sys.argv[1:] if argv is None else argv)
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
