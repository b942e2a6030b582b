"""Buy calibration maps (logit -> probability) that ship inside the exported graphs, and
a fair way to choose between them on valid.

    fitted = fit_calibration("isotonic", logits, targets)          # a CalibrationMap
    p = fitted.apply_numpy(logits)                                 # == torch apply in the graph
    ece = cross_fitted_ece("isotonic", inputs, targets, groups)    # fit on one half, ECE on the other

Kinds (CALIBRATIONS):
- platt:        sigmoid(a * z + b), two parameters by log loss.
- temperature:  sigmoid(z / T), one parameter (keeps the logit's own intercept).
- isotonic:     scikit-learn's IsotonicRegression of the label on z, stored as a
                piecewise-linear table (knots x_k, probabilities y_k) and evaluated in
                the graph as y_0 + sum_k slope_k * clamp(z - x_k, 0, x_{k+1} - x_k):
                elementwise ops only, so it exports through torch.onnx and runs
                identically eagerly, stepped or in the window graph.

Why cross-fitting: the blend (train.fit_blend) and the map are fitted on the same valid
prefixes they would be judged on; in-sample ECE favours the most flexible map (isotonic
reaches ~0 in-sample by construction). Halves are split by session, so a session's
prefixes never sit on both sides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training import metrics

CALIBRATIONS = ("platt", "temperature", "isotonic")
MAX_KNOTS = 64           # isotonic tables are thinned to at most this many knots (graph size)


@dataclass(frozen=True)
class CalibrationMap:
    """kind, and for platt/temperature (scale, shift) on the logit; for isotonic the knots
    (x ascending, y non-decreasing probabilities)."""
    kind: str
    scale: float = 1.0
    shift: float = 0.0
    knots_x: tuple = ()
    knots_y: tuple = ()

    def apply_numpy(self, logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64)
        if self.kind != "isotonic":
            return 1.0 / (1.0 + np.exp(-(z * self.scale + self.shift)))
        return np.interp(z, np.asarray(self.knots_x), np.asarray(self.knots_y))

    def to_record(self) -> dict:
        return {"kind": self.kind, "scale": self.scale, "shift": self.shift,
                "knots_x": list(self.knots_x), "knots_y": list(self.knots_y)}


def isotonic_probability(z: torch.Tensor, knots_x: torch.Tensor, knots_y: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (knots_x, knots_y) at z (any shape), flat outside
    the knots (as numpy.interp): y_0 + sum_k slope_k * clamp(z - x_k, 0, width_k)."""
    width = knots_x[1:] - knots_x[:-1]                                      # (K-1,)
    slope = (knots_y[1:] - knots_y[:-1]) / width.clamp(min=1e-12)           # (K-1,)
    rise = torch.minimum((z.unsqueeze(-1) - knots_x[:-1]).clamp(min=0.0), width)   # (..., K-1)
    return knots_y[0] + (rise * slope).sum(dim=-1)


def _fit_scale_shift(z: np.ndarray, y: np.ndarray, with_shift: bool) -> tuple[float, float] | None:
    zt, yt = torch.from_numpy(z.astype(np.float64)), torch.from_numpy(y.astype(np.float64))
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(zt * params[0] + (params[1] if with_shift else 0.0), yt)
        loss.backward()
        return loss

    optimizer.step(closure)
    scale, shift = (float(v) for v in params.detach())
    shift = shift if with_shift else 0.0
    return (scale, shift) if math.isfinite(scale) and math.isfinite(shift) else None


def fit_calibration(kind: str, logits: np.ndarray, targets: np.ndarray) -> CalibrationMap | None:
    """Fit `kind` (CALIBRATIONS) of the label on the logit; None without both classes."""
    if kind not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {kind!r}")
    logits, targets = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    if len(targets) == 0 or targets.min() == targets.max():
        return None
    if kind in ("platt", "temperature"):
        fitted = _fit_scale_shift(logits, targets, with_shift=kind == "platt")
        return CalibrationMap(kind, *fitted) if fitted else None
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(logits, targets)
    x, y = np.asarray(iso.X_thresholds_, np.float64), np.asarray(iso.y_thresholds_, np.float64)
    if len(x) > MAX_KNOTS:   # keep the ends, thin the inside evenly by rank
        keep = np.unique(np.round(np.linspace(0, len(x) - 1, MAX_KNOTS)).astype(np.int64))
        x, y = x[keep], y[keep]
    if len(x) < 2:           # a constant map: two knots either side
        x, y = np.array([x[0] - 1.0, x[0] + 1.0]), np.array([y[0], y[0]])
    return CalibrationMap("isotonic", knots_x=tuple(float(v) for v in x), knots_y=tuple(float(v) for v in y))


def cross_fitted_ece(kind: str, inputs: np.ndarray, targets: np.ndarray, groups: np.ndarray,
                     seed: int = 0, repeats: int = 5, blend_fn=None) -> float:
    """Mean ECE over `repeats` random session halves, both ways: the map (and, given
    `blend_fn(inputs_A, targets_A) -> logit function`, the blend under it) fitted on one
    half, ECE measured on the other. inputs: the logit (N,) or blend inputs (N, k)."""
    rng = np.random.default_rng(seed)
    sessions = np.unique(groups)
    eces = []
    for _ in range(repeats):
        half = np.isin(groups, rng.choice(sessions, len(sessions) // 2, replace=False))
        for fit_part in (half, ~half):
            logit_of = blend_fn(inputs[fit_part], targets[fit_part]) if blend_fn else (lambda x: x)
            fitted = fit_calibration(kind, logit_of(inputs[fit_part]), targets[fit_part])
            if fitted is None:
                continue
            ece = metrics.expected_calibration_error(targets[~fit_part],
                                                     fitted.apply_numpy(logit_of(inputs[~fit_part])))
            if ece is not None:
                eces.append(ece)
    return float(np.mean(eces)) if eces else float("nan")
