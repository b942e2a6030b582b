"""Session models: one family per file, each with its config dataclass beside it.

    from training.models import build_model
    model = build_model("gru", config_dict)     # rebuilds what a checkpoint stored
"""
from __future__ import annotations

from dataclasses import fields
from typing import Mapping

from training.models.dilated import DilatedConfig, DilatedConvModel
from training.models.gru import GRUConfig, GRUModel

MODEL_KINDS = {"gru": (GRUConfig, GRUModel), "dilated": (DilatedConfig, DilatedConvModel)}


def config_from_dict(kind: str, values: Mapping):
    """The config dataclass of `kind` from a checkpoint's asdict(config); unknown keys are an error."""
    config_cls = MODEL_KINDS[kind][0]
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{kind} config has unknown fields {unknown}")
    return config_cls(**dict(values))


def build_model(kind: str, config):
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind {kind!r} is not one of {sorted(MODEL_KINDS)}")
    if isinstance(config, Mapping):
        config = config_from_dict(kind, config)
    return MODEL_KINDS[kind][1](config)
