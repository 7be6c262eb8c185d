import random

import pytest

from fastdecode.scheduler.perf_model import ErrorTracker, GpuPerfModel, ShardPerfModel, fit_samples_error


def noisy_samples(overhead_s, bandwidth, sizes, noise, seed=0):
    rng = random.Random(seed)
    return [(b, (overhead_s + b / bandwidth) * (1 + rng.uniform(-noise, noise))) for b in sizes]


def test_calibration_recovers_overhead_and_bandwidth_from_noisy_samples():
    sizes = [int(x * 1e6) for x in (1, 2, 4, 8, 16, 32, 64, 128)] * 8
    model = ShardPerfModel.calibrate(noisy_samples(80e-6, 30e9, sizes, noise=0.03))
    assert model.bandwidth_bytes_per_s == pytest.approx(30e9, rel=0.05)
    assert model.overhead_s == pytest.approx(80e-6, rel=0.25)
    held_out = noisy_samples(80e-6, 30e9, [3e6, 50e6, 100e6], noise=0.0)
    assert fit_samples_error(model, held_out) < 0.03


def test_calibration_needs_two_sizes_and_positive_times():
    with pytest.raises(ValueError, match="two or more distinct"):
        ShardPerfModel.calibrate([(1e6, 1e-3), (1e6, 1.1e-3)])
    with pytest.raises(ValueError, match="positive"):
        ShardPerfModel.calibrate([(1e6, 0.0), (2e6, 1e-3)])
    with pytest.raises(ValueError, match="do not grow"):
        ShardPerfModel.calibrate([(1e6, 2e-3), (2e6, 1e-3)])


def test_fit_never_gives_negative_overhead():
    # Times exactly proportional to bytes minus a little: the plain fit would give overhead < 0.
    model = ShardPerfModel.calibrate([(1e6, 0.9e-4), (2e6, 1.95e-4), (4e6, 3.98e-4)])
    assert model.overhead_s == 0.0
    assert model.bandwidth_bytes_per_s == pytest.approx(1e10, rel=0.05)


def test_online_updates_follow_a_shard_that_slows_down_and_track_error():
    sizes = [int(x * 1e6) for x in (1, 4, 16, 64)] * 4
    model = ShardPerfModel.calibrate(noisy_samples(50e-6, 40e9, sizes, noise=0.01))
    assert model.relative_error is None
    rng = random.Random(1)
    # The host gets busy: half the bandwidth, flat-ish live sizes (10-12 MB per call).
    errors = []
    for _ in range(200):
        size = rng.uniform(10e6, 12e6)
        errors.append(model.observe(size, (50e-6 + size / 20e9) * rng.uniform(0.98, 1.02)))
    assert model.predict(11e6) == pytest.approx(50e-6 + 11e6 / 20e9, rel=0.05)
    assert errors[0] > 0.4  # the first prediction was the old, fast model
    assert errors[-1] < 0.05
    assert model.errors.num_observations == 200
    assert model.relative_error == pytest.approx(sum(errors) / len(errors))
    assert model.errors.recent_relative_error < 0.03
    assert model.errors.recent_relative_error < model.relative_error


def test_model_without_calibration_keeps_slope_when_sizes_do_not_vary():
    model = ShardPerfModel(0.0, 10e9)
    for _ in range(50):
        model.observe(1e6, 1e-4 + 1e6 / 10e9)
    assert model.bandwidth_bytes_per_s == pytest.approx(10e9)
    assert model.overhead_s == pytest.approx(1e-4, rel=1e-6)


def test_error_tracker_means():
    tracker = ErrorTracker(update_rate=0.5)
    assert tracker.relative_error is None and tracker.recent_relative_error is None
    assert tracker.record(1.1, 1.0) == pytest.approx(0.1)
    tracker.record(0.7, 1.0)
    assert tracker.relative_error == pytest.approx(0.2)
    assert tracker.recent_relative_error == pytest.approx(0.2)


def test_gpu_model_interpolates_and_extrapolates():
    model = GpuPerfModel([(1, 5e-3), (64, 5e-3), (256, 8e-3), (512, 14e-3), (64, 5e-3)])
    assert model.predict(0) == 0.0
    assert model.predict(1) == pytest.approx(5e-3)
    assert model.predict(0.5) == pytest.approx(5e-3)  # below the sweep: as the smallest batch
    assert model.predict(160) == pytest.approx(6.5e-3)
    assert model.predict(384) == pytest.approx(11e-3)
    assert model.predict(1024) == pytest.approx(26e-3)  # last slope continues
    with pytest.raises(ValueError, match="two or more"):
        GpuPerfModel([(8, 1e-3), (8, 2e-3)])
    with pytest.raises(ValueError, match="positive integers"):
        GpuPerfModel([(0, 1e-3), (8, 2e-3)])


def test_gpu_model_takes_the_sweep_as_non_decreasing_in_batch():
    # the dev VM's start-up sweep with batch 1 on a slow two-thread kernel path (batches 2-8 run on one thread)
    model = GpuPerfModel([(1, 1.94e-3), (8, 0.263e-3), (32, 2.27e-3), (64, 1.9e-3), (128, 3e-3)])
    assert model.samples == [(1, 0.263e-3), (8, 0.263e-3), (32, 1.9e-3), (64, 1.9e-3), (128, 3e-3)]
    assert model.predict(2) == pytest.approx(0.263e-3)  # not 1.70 ms, interpolated through batch 1's time
    assert model.predict(48) == pytest.approx(1.9e-3)
    rising = [(1, 5e-3), (64, 5e-3), (256, 8e-3)]
    assert GpuPerfModel(rising).samples == rising  # a sweep that never falls is kept as it is


def test_gpu_model_learns_from_measured_steps():
    model = GpuPerfModel([(1, 5e-3), (128, 6e-3), (256, 9e-3)], update_rate=0.2)
    truth = {96: 7e-3, 200: 8.5e-3}
    first = [model.observe(b, s) for b, s in truth.items()]
    for _ in range(100):
        for batch, seconds in truth.items():
            model.observe(batch, seconds)
    for batch, seconds in truth.items():
        assert model.predict(batch) == pytest.approx(seconds, rel=0.02)
    assert max(first) > 0.05
    assert model.errors.recent_relative_error < 0.02
    model.observe(1024, 30e-3)  # beyond the sweep: a new knot
    assert model.samples[-1] == (1024, 30e-3)
    assert model.predict(1024) == pytest.approx(30e-3)
