"""The latency predictor on hand-made observations: per-bucket lines, quantile margins, the co-run window model,
persistence and the error report, each checked against answers computed here by hand or with numpy."""

import math

import numpy as np
import pytest

from harli_jax.runtime.predictor import LatencyPredictor, _margin

B1, B2, B3, B4 = (8, 64, 16), (16, 128, 32), (32, 256, 64), (64, 512, 128)
FWD, BWD = ("forward", 2), ("backward", 2)
# Five latencies at one context: median 3 (mean 4); residuals 3/3 - 1 sorted are -2/3, -1/3, 0, 1/3, 7/3, whose
# 0.875 quantile (position 3.5 of 0..4) is (1/3 + 7/3) / 2 = 4/3.
SPREAD = [1.0, 2.0, 3.0, 4.0, 10.0]


def _line(p, bucket, a, b, contexts=range(0, 4096, 512)):
    for c in contexts:
        p.observe_step(bucket, c, a + b * c)


def test_exact_line_is_recovered_per_bucket():
    p = LatencyPredictor()
    _line(p, B1, 2e-3, 1e-5)
    _line(p, B2, 5e-3, 2e-6)
    assert p.unfitted == 16
    p.fit()
    assert p.unfitted == 0
    assert p.step_coef[B1] == pytest.approx((2e-3, 1e-5), rel=1e-6)
    assert p.step_coef[B2] == pytest.approx((5e-3, 2e-6), rel=1e-6)
    assert p.step(B1, 1000).mean == pytest.approx(2e-3 + 1e-2, rel=1e-6)
    assert p.step_margin == pytest.approx(0.0, abs=1e-9)


def test_noisy_lines_match_least_squares_and_margin_is_the_pooled_quantile():
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, 4096, 200)
    lat = (3e-3 + 2e-6 * ctx) * (1 + rng.normal(0, 0.01, 200))
    p = LatencyPredictor(quantile=0.9)
    for c, t in zip(ctx, lat, strict=True):
        p.observe_step(B1, int(c), float(t))
    for t in SPREAD:
        p.observe_step(B2, 512, t)
    p.fit()
    slope, intercept = np.polyfit(ctx, lat, 1)
    assert p.step_coef[B1] == pytest.approx((intercept, slope), rel=1e-6)
    assert p.step_coef[B1] == pytest.approx((3e-3, 2e-6), rel=0.05)
    rel = np.concatenate([lat / (intercept + slope * ctx) - 1, np.array(SPREAD) / 3.0 - 1])
    assert p.step_margin == pytest.approx(np.quantile(rel, 0.9), rel=1e-6)
    s = p.step(B1, 2000)
    assert s.bound == pytest.approx(s.mean * (1 + p.step_margin), rel=1e-12)


def test_median_when_context_does_not_vary_or_too_few_samples_or_negative_intercept():
    p = LatencyPredictor()
    for c, t in zip((4000, 3000, 2000, 1000, 0), SPREAD, strict=True):
        p.observe_step(B1, 512, t)
        p.observe_step(B4, c, t)  # falling with the context: the slope is held at 0
    for c in (0, 100, 200):  # 3 samples on the line 1 + 0.01 c: too few, median 2
        p.observe_step(B2, c, 1 + 0.01 * c)
    for c in (200, 300, 400, 500):  # the line -1 + 0.01 c has a negative intercept: median 2.5
        p.observe_step(B3, c, -1 + 0.01 * c)
    p.fit()
    assert {b: p.step_coef[b] for b in (B1, B2, B3)} == {B1: (3.0, 0.0), B2: (2.0, 0.0), B3: (2.5, 0.0)}
    assert p.step(B1, 10**6).mean == 3.0
    assert p.step_coef[B4][1] == 0.0 and p.step(B4, 10**6).mean == p.step(B4, 0).mean > 0


def test_step_and_micro_margins_by_hand():
    p = LatencyPredictor(quantile=0.875)
    for t in SPREAD:
        p.observe_step(B1, 0, t)
        p.observe_micro(FWD, t)
    for _ in range(3):
        p.observe_micro(BWD, 5.0)
    p.fit()
    assert p.step_margin == pytest.approx(4 / 3)
    assert p.step(B1, 0).mean == 3.0 and p.step(B1, 0).bound == pytest.approx(7.0)
    assert p.micro_mean == {FWD: 3.0, BWD: 5.0}  # medians, not means (4 and 5)
    # Pooled residuals sorted: -2/3, -1/3, 0, 0, 0, 0, 1/3, 7/3; position 0.875 * 7 = 6.125 -> 1/3 + 0.125 * 2.
    assert p.micro_margin == pytest.approx(1 / 3 + 0.25)
    assert p.micro(FWD).bound == pytest.approx(3.0 * (1 + 7 / 12))
    assert p.micro(("forward", 4)).mean == math.inf


def test_margin_is_never_negative_stays_default_without_samples_and_guards_tiny_predictions():
    p = LatencyPredictor(quantile=0.1)  # the 0.1 quantile of the residuals above is negative
    for t in SPREAD:
        p.observe_micro(FWD, t)
    p.fit()
    assert p.micro_margin == 0.0
    assert p.step_margin == 0.25 and p.window_margin == 0.25
    # A prediction under half the smallest actual counts as that half: residuals 1/0.5 - 1 and 2/2 - 1.
    assert _margin(np.array([0.0, 2.0]), np.array([1.0, 2.0]), 1.0) == 1.0


def test_unseen_bucket_uses_the_slowest_line_at_that_context():
    p = LatencyPredictor()
    assert p.step(B1, 0).mean == math.inf and p.step(B1, 0).bound == math.inf
    _line(p, B1, 1.0, 0.01)
    _line(p, B2, 3.0, 0.001)
    p.fit()
    assert p.step(B3, 100).mean == pytest.approx(3.1)  # B1 gives 2, B2 3.1
    assert p.step(B3, 1000).mean == pytest.approx(11.0)  # B1 gives 11, B2 4
    assert p.step(B3, 1000).bound == pytest.approx(11.0 * (1 + p.step_margin))


def test_window_before_any_window_fit():
    p = LatencyPredictor(quantile=0.875)
    for t in SPREAD:
        p.observe_step(B1, 0, t)
    for _ in range(4):
        p.observe_micro(FWD, 0.5)
    p.fit()
    assert p.window(B1, 0, []) == p.step(B1, 0)
    w = p.window(B1, 0, [FWD, FWD])  # 3 + 2 * 0.5, margin max(0.25, 4/3, 0)
    assert w.mean == 4.0 and w.bound == pytest.approx(4.0 * 7 / 3)
    for margins in [(0.5, 0.1, 0.2), (0.1, 0.5, 0.2), (0.1, 0.2, 0.5)]:
        p.window_margin, p.step_margin, p.micro_margin = margins
        assert p.window(B1, 0, [FWD]).bound == pytest.approx(3.5 * 1.5)
        assert p.window(B1, 0, []) == p.step(B1, 0)


def test_window_coefficients_are_fitted_from_16_windows_with_training():
    p = LatencyPredictor()
    _line(p, B1, 2e-3, 1e-6)
    for _ in range(4):
        p.observe_micro(FWD, 1e-3)
        p.observe_micro(BWD, 3e-3)
    p.fit()

    def truth(ctx, n_fwd, n_bwd):  # the co-run law the fit has to find
        return 5e-4 + 1.2 * (2e-3 + 1e-6 * ctx) + 1.5 * (1e-3 * n_fwd + 3e-3 * n_bwd) + 1e-4 * (n_fwd + n_bwd)

    rng = np.random.default_rng(1)  # (context, forward chunks, backward chunks >= 1) per window
    windows = list(zip(*(rng.integers(lo, hi, 16).tolist() for lo, hi in ((0, 4000), (0, 4), (1, 4))), strict=True))
    for ctx, n_fwd, n_bwd in windows[:15]:
        p.observe_window(B1, ctx, [FWD] * n_fwd + [BWD] * n_bwd, truth(ctx, n_fwd, n_bwd))
    for ctx in range(10):
        p.observe_window(B1, ctx, [], 1.0)  # windows without training do not count
    p.fit()
    assert p.window_coef == (0.0, 1.0, 1.0, 0.0) and p.window_margin == 0.25
    ctx, n_fwd, n_bwd = windows[15]
    p.observe_window(B1, ctx, [FWD] * n_fwd + [BWD] * n_bwd, truth(ctx, n_fwd, n_bwd))
    # Scored held-out, with the initial coefficients: mean = step + micro, bound = mean * 1.25.
    first = windows[0]
    mean0 = 2e-3 + 1e-6 * first[0] + 1e-3 * first[1] + 3e-3 * first[2]
    assert p.evaluations[0] == pytest.approx((mean0 * 1.25, mean0, truth(*first)))
    p.fit()
    assert p.window_coef != (0.0, 1.0, 1.0, 0.0)
    assert p.window_coef == pytest.approx((5e-4, 1.2, 1.5, 1e-4), rel=1e-5, abs=1e-9)
    assert p.window_margin == pytest.approx(0.0, abs=1e-6)
    assert p.window(B1, 1234, [FWD, BWD, BWD]).mean == pytest.approx(truth(1234, 1, 2), rel=1e-6)
    assert p.window(B1, 1234, []) == p.step(B1, 1234)


def _calibrated():
    rng = np.random.default_rng(2)
    p = LatencyPredictor(quantile=0.9)
    for c in rng.integers(0, 4096, 50):
        p.observe_step(B1, int(c), float((3e-3 + 2e-6 * c) * (1 + rng.normal(0, 0.02))))
    for t in SPREAD:
        p.observe_step(B2, 512, t)
        p.observe_micro(FWD, t * 1e-3)
    p.observe_micro(BWD, 2e-3)
    p.fit()
    return p


def _predictions(p):
    return ([p.step(b, c) for b in (B1, B2, B3) for c in (0, 777, 4096)] + [p.micro(k) for k in (FWD, BWD)]
            + [p.window(B1, 100, [FWD, BWD]), p.window(B3, 9, [BWD])])


def test_save_load_and_json_round_trips_give_the_same_predictions(tmp_path):
    p = _calibrated()
    path = tmp_path / "cache" / "predictor.json"
    p.save(path)
    for q in (LatencyPredictor.load(path), LatencyPredictor.from_json(p.to_json())):
        assert q is not None and q.quantile == 0.9
        assert q.step_coef == p.step_coef and q.micro_mean == p.micro_mean
        assert (q.step_margin, q.micro_margin) == (p.step_margin, p.micro_margin)
        assert _predictions(q) == _predictions(p)


@pytest.mark.parametrize("text", ["{not json", "{}", "[]", "null", '{"quantile": 0.9, "micro": {}}',
                                  '{"quantile": 0.9, "steps": {"[1]": [[1, 2, 3]]}, "micro": {}}'])
def test_load_of_a_missing_or_corrupt_file_is_none(tmp_path, text):
    assert LatencyPredictor.load(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text(text)
    assert LatencyPredictor.load(tmp_path / "bad.json") is None


def test_error_report_by_hand():
    p = LatencyPredictor(quantile=0.875)
    assert p.error_report()["windows"] == 0
    for t in SPREAD:
        p.observe_step(B1, 0, t)
    p.fit()  # mean 3, bound 7
    for actual in (3.0, 6.0, 1.5, 12.0, 7.0):  # |3 - actual| / actual: 0, 1/2, 1, 3/4, 4/7
        p.observe_window(B1, 0, [], actual)
    p.observe_window(B1, 0, [("forward", 9)], 1.0)  # unknown micro-step: predicted inf, left out of the APE
    report = p.error_report()
    assert report["windows"] == 6
    assert report["mape"] == pytest.approx((0 + 0.5 + 1 + 0.75 + 4 / 7) / 5)
    assert report["p99_ape"] == pytest.approx(0.75 + 0.96 * 0.25)  # sorted 0, 1/2, 4/7, 3/4, 1: position 3.96
    assert report["under_prediction_rate"] == pytest.approx(1 / 6)  # only 12 > 7; 7 is on its bound


def test_error_report_with_only_infinite_predictions():
    p = LatencyPredictor()
    p.observe_window(B1, 0, [], 1.0)
    r = p.error_report()
    assert (r["windows"], r["under_prediction_rate"], math.isnan(r["mape"]), math.isnan(r["p99_ape"])) == (1, 0, 1, 1)


FUSED = (*B1, "tokens", 8)


def test_held_out_steps_set_a_conformal_margin_per_stage_and_are_reported():
    p = LatencyPredictor(quantile=0.9)
    _line(p, B1, 1.0, 0.0)
    for c in range(4):
        p.observe_step(FUSED, c, 2.0)
    p.fit()
    assert p.fused(FUSED, 0).mean == pytest.approx(2.0) and p.fused((*B1, "backward", 1), 0) is None
    assert p.step(B3, 0).mean == pytest.approx(1.0)  # an unseen bucket: the slowest inference line, not fused
    # 40 held-out steps: 1.0 predicted, measured 1.0 .. 1.39; the conformal rank ceil(41 * 0.9) = 37 -> 1.36.
    for i in range(40):
        p.observe_step(B1, 0, 1.0 + i / 100)
    p.fit()
    assert p.step_margin == pytest.approx(0.36)
    assert p.fused_margin == 0.0  # the fused stage has no held-out samples yet: its in-sample residuals
    stages = p.error_report()["stages"]
    assert stages["step"]["samples"] == 40 and stages["fused"] == {"samples": 0}
    assert stages["step"]["mape"] == pytest.approx(np.mean([(i / 100) / (1 + i / 100) for i in range(40)]))
    assert stages["step"]["under_prediction_rate"] == pytest.approx(39 / 40)  # bound 1.0 until the refit


def test_background_refit_installs_the_same_coefficients_and_the_host_bound():
    p, q = LatencyPredictor(quantile=0.5), LatencyPredictor(quantile=0.5)
    for predictor in (p, q):
        _line(predictor, B1, 2e-3, 1e-5)
        for seconds in (1e-4, 2e-4, 3e-4):
            predictor.observe_host(seconds)
    p.fit()
    q.fit_async()
    q.wait_fit()
    assert q.step_coef == p.step_coef and q.host_bound() == p.host_bound() == pytest.approx(2e-4)
