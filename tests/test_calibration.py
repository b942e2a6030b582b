"""Buy calibration maps (training/calibration.py): the graph's isotonic table == numpy's
interpolation, the fits recover what they should, and the cross-fitted ECE used to choose
between them on valid tells a miscalibrated score from a calibrated one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.calibration import CALIBRATIONS, cross_fitted_ece, fit_calibration, isotonic_probability


def synthetic(n=6000, seed=0, scale=2.0, shift=-1.5):
    """Logits z and labels drawn from sigmoid(scale * z + shift): Platt's true map."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(scale * z + shift)))).astype(float)
    groups = np.repeat(np.arange(n // 4), 4)                        # 4 prefixes a session
    return z, y, groups


def test_isotonic_table_in_torch_equals_numpy_interp_inside_and_outside_the_knots():
    z, y, _ = synthetic()
    fitted = fit_calibration("isotonic", z, y)
    assert 2 <= len(fitted.knots_x) <= 64
    assert np.all(np.diff(fitted.knots_x) > 0) and np.all(np.diff(fitted.knots_y) >= 0)
    probe = np.concatenate([np.linspace(-6, 6, 501), np.asarray(fitted.knots_x)])   # knots, between, beyond
    got = isotonic_probability(torch.from_numpy(probe), torch.tensor(fitted.knots_x, dtype=torch.float64),
                               torch.tensor(fitted.knots_y, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, fitted.apply_numpy(probe), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[:1], fitted.knots_y[0])          # flat below the first knot


def test_isotonic_table_exports_to_onnx_and_matches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    z, y, _ = synthetic()
    fitted = fit_calibration("isotonic", z, y)
    kx, ky = (torch.tensor(v, dtype=torch.float64) for v in (fitted.knots_x, fitted.knots_y))

    class Map(torch.nn.Module):
        def forward(self, logit):
            return isotonic_probability(logit, kx, ky)

    path = tmp_path / "iso.onnx"
    torch.onnx.export(Map(), (torch.zeros(3, 5, dtype=torch.float64),), str(path), input_names=["logit"],
                      output_names=["p"], dynamic_axes={"logit": {0: "b", 1: "w"}}, dynamo=False)
    probe = np.random.default_rng(1).normal(scale=3, size=(4, 7))
    got = ort.InferenceSession(str(path)).run(None, {"logit": probe})[0]
    np.testing.assert_allclose(got, fitted.apply_numpy(probe), rtol=0, atol=1e-12)


def test_platt_recovers_the_true_map_and_temperature_keeps_no_shift():
    z, y, _ = synthetic(n=20000)
    platt = fit_calibration("platt", z, y)
    assert abs(platt.scale - 2.0) < 0.15 and abs(platt.shift + 1.5) < 0.1
    temperature = fit_calibration("temperature", z, y)
    assert temperature.shift == 0.0 and temperature.scale > 0


def test_one_class_gives_no_map_and_an_unknown_kind_is_refused():
    assert fit_calibration("platt", np.zeros(5), np.zeros(5)) is None
    with pytest.raises(ValueError, match="calibration must be one of"):
        fit_calibration("beta", np.zeros(5), np.array([0, 1, 0, 1, 0.0]))


@pytest.mark.parametrize("kind", CALIBRATIONS)
def test_cross_fitted_ece_is_low_for_a_fitted_map_on_the_true_logit(kind):
    # temperature has no intercept: its true map here has none either
    z, y, groups = synthetic(shift=0.0 if kind == "temperature" else -1.5)
    ece = cross_fitted_ece(kind, z, y, groups, repeats=2)
    assert 0 <= ece < 0.03


def test_cross_fitted_ece_with_a_blend_refitted_per_half():
    """The blend is fitted on the fitting half too (nothing measured in-sample); a map that
    cannot undo a shifted logit (temperature has no intercept) scores clearly worse."""
    z, y, groups = synthetic()
    noise = np.random.default_rng(5).normal(size=len(z))
    inputs = np.stack([z, noise], axis=1)                           # (N, 2)

    def blend_fn(x, t):
        fitted = fit_calibration("platt", x[:, 0], t)
        return lambda v: fitted.scale * v[:, 0] + fitted.shift

    good = cross_fitted_ece("platt", inputs, y, groups, repeats=2, blend_fn=blend_fn)
    assert good < 0.03
    skewed = cross_fitted_ece("temperature", z * 2.0 - 1.5 + 1.0, y, groups, repeats=2)   # shift it cannot undo
    assert skewed > good + 0.05
