"""Measured time models: a shard's attend call and the GPU's dense step.

``ShardPerfModel`` predicts one attend call (one layer, one mini-batch) as
``overhead_s + kv_bytes / bandwidth``.  It is calibrated by least squares on a
short benchmark and refitted online, by exponentially weighted least squares,
from every measured call.  ``GpuPerfModel`` predicts the dense step time T(B)
of a batch of B sequences by piecewise-linear interpolation of a start-up sweep,
nudged online by each measured step.  Both track their measured relative error
``|predicted - measured| / measured`` over the observations they were given.

Pure arithmetic: the callers measure and report; nothing here reads a clock.
"""
from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Iterable, Sequence


def _check_time(seconds: float, what: str) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{what} must be a positive finite number of seconds, got {seconds!r}")
    return float(seconds)


def _check_size(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a non-negative finite number, got {value!r}")
    return float(value)


def _check_rate(rate: float) -> float:
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"update_rate must be in (0, 1], got {rate!r}")
    return float(rate)


class ErrorTracker:
    """Relative prediction error: the mean over all observations and a recent (EWMA) one."""

    def __init__(self, update_rate: float = 0.05) -> None:
        self._rate = _check_rate(update_rate)
        self._sum = 0.0
        self._recent = 0.0
        self.num_observations = 0

    def record(self, predicted_s: float, measured_s: float) -> float:
        error = abs(predicted_s - measured_s) / measured_s
        self._sum += error
        self._recent = error if self.num_observations == 0 else self._recent + self._rate * (error - self._recent)
        self.num_observations += 1
        return error

    @property
    def relative_error(self) -> float | None:
        """Mean ``|pred - meas| / meas`` over every observation, None before the first."""
        return self._sum / self.num_observations if self.num_observations else None

    @property
    def recent_relative_error(self) -> float | None:
        """The same error, exponentially weighted towards the latest observations."""
        return self._recent if self.num_observations else None


class _Moments:
    """Weighted mean and co-moments of (x, y) pairs, updated incrementally (West 1979)."""

    def __init__(self) -> None:
        self.weight = 0.0
        self.mean_x = 0.0
        self.mean_y = 0.0
        self.cov_xx = 0.0
        self.cov_xy = 0.0

    def add(self, x: float, y: float, *, decay: float = 1.0) -> None:
        self.weight *= decay
        self.cov_xx *= decay
        self.cov_xy *= decay
        self.weight += 1.0
        dx = x - self.mean_x
        self.mean_x += dx / self.weight
        self.mean_y += (y - self.mean_y) / self.weight
        self.cov_xx += dx * (x - self.mean_x)
        self.cov_xy += dx * (y - self.mean_y)


class ShardPerfModel:
    """Attend time of one node: ``overhead_s + kv_bytes / bandwidth_bytes_per_s``.

    ``calibrate`` fits a start-up benchmark by ordinary least squares.  Online,
    each measured call has weight 1 and older ones are scaled by ``1 - update_rate``
    (an exponentially weighted fit that follows a shard whose speed drifts).  The
    refit passes through the weighted mean of the recent calls, so the model
    predicts where the shard actually operates, and takes its slope from them
    shrunk towards the calibrated slope::

        slope = (C_xy + strength * calibrated_slope) / (C_xx + strength)

    with ``C`` the recent calls' weighted co-moments and ``strength`` the
    calibration's spread of sizes at a total weight of ``prior_weight`` (at least
    ``prior_weight`` calls spread by ``MIN_RELATIVE_SPREAD`` around the recent
    mean).  Live calls that all read about the same bytes (a flat, load-stabilised
    batch) so keep the calibrated slope and correct the overhead; calls over a
    wide range of sizes re-measure the slope.  A fit with a negative overhead
    falls back to a line through the origin.

    The refitted bandwidth stays within ``MAX_SPEEDUP`` times and ``1 / MAX_SLOWDOWN``
    of the calibrated one.  The calibration measured the node's own memory reading
    the same cache, so live traffic cannot make it much faster; a busy host can make
    it several times slower.  Without the band a few noisy calls (a measured time of
    about nothing for many bytes) can turn the slope flat, and a node that predicts
    the same time whatever it holds draws every new sequence to it.
    """

    MIN_RELATIVE_SPREAD = 0.05
    MAX_SPEEDUP = 2.0
    MAX_SLOWDOWN = 16.0

    def __init__(
        self, overhead_s: float, bandwidth_bytes_per_s: float, *, update_rate: float = 0.05, prior_weight: float = 5.0
    ) -> None:
        if not math.isfinite(overhead_s) or overhead_s < 0:
            raise ValueError(f"overhead_s must be >= 0, got {overhead_s!r}")
        if not math.isfinite(bandwidth_bytes_per_s) or bandwidth_bytes_per_s <= 0:
            raise ValueError(f"bandwidth_bytes_per_s must be > 0, got {bandwidth_bytes_per_s!r}")
        if not math.isfinite(prior_weight) or prior_weight <= 0:
            raise ValueError(f"prior_weight must be > 0, got {prior_weight!r}")
        self._rate = _check_rate(update_rate)
        self._prior_weight = float(prior_weight)
        self._overhead_s = float(overhead_s)
        self._seconds_per_byte = 1.0 / float(bandwidth_bytes_per_s)
        self._prior_slope = self._seconds_per_byte
        self._prior_overhead_s = self._overhead_s
        self._prior_variance = 0.0  # of the calibration sizes
        self._recent = _Moments()
        self.errors = ErrorTracker(update_rate)
        # Added to predictions until this node has measurements of its own: the per-message cost
        # (wire, queueing, message handling) the caller measured on other nodes (see Scheduler).
        self.unmeasured_overhead_s = 0.0

    @classmethod
    def calibrate(
        cls, samples: Iterable[tuple[float, float]], *, update_rate: float = 0.05, prior_weight: float = 5.0
    ) -> ShardPerfModel:
        """Least-squares fit of (kv_bytes, seconds) samples from a start-up benchmark.

        Needs at least two distinct sizes to separate overhead from bandwidth.
        """
        pairs = [(_check_size(b, "kv_bytes"), _check_time(s, "seconds")) for b, s in samples]
        if len({b for b, _ in pairs}) < 2:
            raise ValueError("calibration needs samples at two or more distinct kv_bytes sizes")
        m = _Moments()
        for kv_bytes, seconds in pairs:
            m.add(kv_bytes, seconds)
        slope = m.cov_xy / m.cov_xx
        if slope <= 0:
            raise ValueError("calibration samples do not grow with kv_bytes; cannot fit a bandwidth")
        intercept = m.mean_y - slope * m.mean_x
        if intercept < 0:  # fit through the origin instead
            intercept = 0.0
            slope = (m.cov_xy / m.weight + m.mean_x * m.mean_y) / (m.cov_xx / m.weight + m.mean_x**2)
        model = cls(intercept, 1.0 / slope, update_rate=update_rate, prior_weight=prior_weight)
        model._prior_variance = m.cov_xx / m.weight
        return model

    @property
    def overhead_s(self) -> float:
        return self._overhead_s

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return 1.0 / self._seconds_per_byte

    @property
    def relative_error(self) -> float | None:
        return self.errors.relative_error

    def predict(self, kv_bytes: float) -> float:
        """Predicted seconds for one attend call reading ``kv_bytes`` of KV-cache."""
        extra = self.unmeasured_overhead_s if self.errors.num_observations == 0 else 0.0
        return self._overhead_s + extra + _check_size(kv_bytes, "kv_bytes") * self._seconds_per_byte

    def predict_calibrated(self, kv_bytes: float) -> float:
        """The calibration's prediction (the bare call), whatever was measured since."""
        return self._prior_overhead_s + _check_size(kv_bytes, "kv_bytes") * self._prior_slope

    def observe(self, kv_bytes: float, seconds: float) -> float:
        """Record a measured call: track the error of the prediction, then refit. Returns that error."""
        kv_bytes = _check_size(kv_bytes, "kv_bytes")
        seconds = _check_time(seconds, "seconds")
        error = self.errors.record(self.predict(kv_bytes), seconds)
        self._recent.add(kv_bytes, seconds, decay=1.0 - self._rate)
        self._refit()
        return error

    def _refit(self) -> None:
        m = self._recent
        floor = (self.MIN_RELATIVE_SPREAD * m.mean_x) ** 2
        strength = self._prior_weight * max(self._prior_variance, floor)
        if strength == 0.0:  # only calls of 0 bytes so far: all of it is overhead
            self._overhead_s = m.mean_y
            return
        slope = self._within_band((m.cov_xy + strength * self._prior_slope) / (m.cov_xx + strength))
        intercept = m.mean_y - slope * m.mean_x
        if intercept < 0:  # a line through the origin instead, its slope within the band too
            slope = self._within_band(m.mean_y / m.mean_x)
            intercept = max(m.mean_y - slope * m.mean_x, 0.0)
        self._overhead_s, self._seconds_per_byte = intercept, slope

    def _within_band(self, slope: float) -> float:
        return min(max(slope, self._prior_slope / self.MAX_SPEEDUP), self._prior_slope * self.MAX_SLOWDOWN)


class GpuPerfModel:
    """Dense step time T(B) from (batch, seconds) samples, piecewise linear in B.

    Below the smallest sampled batch the prediction is that batch's time (a dense
    step is bound by reading the weights there); above the largest it follows the
    last segment's slope (never negative).  ``observe`` moves the two knots around
    a measured batch by ``update_rate`` times the residual, split by their
    interpolation weights; a batch above the range becomes a new knot.

    The samples are made non-decreasing in B: a batch timed slower than a larger
    one gets the larger one's time.  A pass over more rows does all the work of a
    smaller one; a smaller batch timed slower ran another kernel path at a slow
    moment.  On the dev VM torch runs tiny's batch 1 on two threads and batches
    2-8 on one, and in about half of the cluster starts the two-thread passes were
    2-13x slower during the sweep (as with ``OMP_WAIT_POLICY=PASSIVE``, the second
    thread asleep between parallel regions): batch 1 at 0.5-3.6 ms against 0.25 ms
    at batch 8, and 0.27 ms when timed again later in the run.  Interpolated through
    that knot, batch 2 (0.22 ms) was predicted at several times its pass, and the
    step model's per-call overhead, which never goes below zero, could not take it
    back: batch 4's steps (two mini-batches of 2) were over-predicted, by 15-20 %
    in the failing live-test runs.  A dense time predicted too low, by contrast,
    is what that overhead learns.
    """

    def __init__(self, samples: Iterable[tuple[int, float]], *, update_rate: float = 0.1) -> None:
        self._rate = _check_rate(update_rate)
        grouped: dict[int, list[float]] = {}
        for batch, seconds in samples:
            if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
                raise ValueError(f"batch sizes must be positive integers, got {batch!r}")
            grouped.setdefault(int(batch), []).append(_check_time(seconds, "seconds"))
        if len(grouped) < 2:
            raise ValueError("a GPU sweep needs samples at two or more distinct batch sizes")
        self._batches = sorted(grouped)
        self._seconds = [sum(grouped[b]) / len(grouped[b]) for b in self._batches]
        for i in range(len(self._seconds) - 2, -1, -1):  # non-decreasing in B (see above)
            self._seconds[i] = min(self._seconds[i], self._seconds[i + 1])
        self.errors = ErrorTracker(update_rate)

    @property
    def samples(self) -> list[tuple[int, float]]:
        """The current knots as (batch, seconds), ascending."""
        return list(zip(self._batches, self._seconds))

    @property
    def relative_error(self) -> float | None:
        return self.errors.relative_error

    def predict(self, batch: float) -> float:
        """Predicted seconds of one dense step for ``batch`` sequences (0 for an empty batch)."""
        batch = _check_size(batch, "batch")
        if batch == 0:
            return 0.0
        xs, ys = self._batches, self._seconds
        if batch <= xs[0]:
            return ys[0]
        i = min(bisect.bisect_left(xs, batch), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        slope = (y1 - y0) / (x1 - x0)
        if batch > x1:
            slope = max(slope, 0.0)
        return max(y0 + slope * (batch - x0), 0.0)

    def observe(self, batch: int, seconds: float) -> float:
        """Record a measured dense step; returns the relative error of its prediction."""
        if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        batch = int(batch)
        seconds = _check_time(seconds, "seconds")
        error = self.errors.record(self.predict(batch), seconds)
        xs, ys = self._batches, self._seconds
        if batch > xs[-1]:
            xs.append(batch)
            ys.append(seconds)
            return error
        residual = seconds - self.predict(batch)
        i = bisect.bisect_left(xs, batch)
        if xs[i] == batch or i == 0:
            ys[i] = max(ys[i] + self._rate * residual, 1e-12)
            return error
        w1 = (batch - xs[i - 1]) / (xs[i] - xs[i - 1])
        ys[i - 1] = max(ys[i - 1] + self._rate * (1.0 - w1) * residual, 1e-12)
        ys[i] = max(ys[i] + self._rate * w1 * residual, 1e-12)
        return error


def fit_samples_error(model: ShardPerfModel | GpuPerfModel, samples: Sequence[tuple[float, float]]) -> float:
    """Mean relative error of ``model`` on held-out samples (does not update the model)."""
    if not samples:
        raise ValueError("need at least one sample")
    return sum(abs(model.predict(x) - _check_time(y, "seconds")) / y for x, y in samples) / len(samples)
