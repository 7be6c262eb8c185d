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
from collections.abc import Iterable, Sequence

def _check_time(seconds: float, what: str) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{what} must be a positive finite number of seconds, got {seconds!r}")
    return float(seconds)


def _check_size(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
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

    def scaled(self, total_weight: float) -> _Moments:
        out = _Moments()
        factor = total_weight / self.weight if self.weight else 0.0
        out.weight, out.mean_x, out.mean_y = self.weight * factor, self.mean_x, self.mean_y
        out.cov_xx, out.cov_xy = self.cov_xx * factor, self.cov_xy * factor
        return out

    def merged(self, other: _Moments) -> _Moments:
        if other.weight == 0:
            return self
        if self.weight == 0:
            return other
        out = _Moments()
        out.weight = self.weight + other.weight
        share = other.weight / out.weight
        dx, dy = other.mean_x - self.mean_x, other.mean_y - self.mean_y
        out.mean_x = self.mean_x + share * dx
        out.mean_y = self.mean_y + share * dy
        between = self.weight * share
        out.cov_xx = self.cov_xx + other.cov_xx + between * dx * dx
        out.cov_xy = self.cov_xy + other.cov_xy + between * dx * dy
        return out


class ShardPerfModel:
    """Attend time of one node: ``overhead_s + kv_bytes / bandwidth_bytes_per_s``.

    The fit combines two sets of weighted moments of (bytes, seconds): the
    calibration benchmark, kept as a fixed prior of total weight
    ``prior_weight``, and the measured calls, each of weight 1 with older ones
    scaled by ``1 - update_rate`` per new call.  The prior keeps the fit
    well-posed when live calls all read about the same number of bytes (a flat,
    load-stabilised batch); the recent calls let it follow a shard whose speed
    drifts.  When the sizes are too alike to separate overhead from bandwidth
    (relative spread under ``MIN_RELATIVE_SPREAD``), the slope is kept and only
    the overhead is refitted.  The fit never yields a negative overhead (it
    falls back to a line through the origin) nor a non-positive bandwidth.
    """

    MIN_RELATIVE_SPREAD = 0.05

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
        self._prior = _Moments()
        self._recent = _Moments()
        self.errors = ErrorTracker(update_rate)

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
        model = cls(0.0, 1.0, update_rate=update_rate, prior_weight=prior_weight)
        moments = _Moments()
        for kv_bytes, seconds in pairs:
            moments.add(kv_bytes, seconds)
        model._fit(moments, force=True)
        model._prior = moments.scaled(prior_weight)
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
        return self._overhead_s + _check_size(kv_bytes, "kv_bytes") * self._seconds_per_byte

    def observe(self, kv_bytes: float, seconds: float) -> float:
        """Record a measured call: track the error of the prediction, then refit. Returns that error."""
        kv_bytes = _check_size(kv_bytes, "kv_bytes")
        seconds = _check_time(seconds, "seconds")
        error = self.errors.record(self.predict(kv_bytes), seconds)
        self._recent.add(kv_bytes, seconds, decay=1.0 - self._rate)
        self._fit(self._prior.merged(self._recent), force=False)
        return error

    def _fit(self, m: _Moments, *, force: bool) -> None:
        variance = m.cov_xx / m.weight
        if force or variance > (self.MIN_RELATIVE_SPREAD * m.mean_x) ** 2:
            slope = m.cov_xy / m.cov_xx if m.cov_xx > 0 else 0.0
            if slope > 0:
                intercept = m.mean_y - slope * m.mean_x
                if intercept >= 0:
                    self._overhead_s, self._seconds_per_byte = intercept, slope
                    return
                # A negative overhead: fit a line through the origin instead.
                second_moment = variance + m.mean_x**2
                self._overhead_s = 0.0
                self._seconds_per_byte = (m.cov_xy / m.weight + m.mean_x * m.mean_y) / second_moment
                return
            if force:
                raise ValueError("calibration samples do not grow with kv_bytes; cannot fit a bandwidth")
        # Sizes too alike (or a non-positive slope): keep the slope, refit the overhead.
        self._overhead_s = max(0.0, m.mean_y - self._seconds_per_byte * m.mean_x)


class GpuPerfModel:
    """Dense step time T(B) from (batch, seconds) samples, piecewise linear in B.

    Below the smallest sampled batch the prediction is that batch's time (a dense
    step is bound by reading the weights there); above the largest it follows the
    last segment's slope (never negative).  ``observe`` moves the two knots around
    a measured batch by ``update_rate`` times the residual, split by their
    interpolation weights; a batch above the range becomes a new knot.
    """

    def __init__(self, samples: Iterable[tuple[int, float]], *, update_rate: float = 0.1) -> None:
        self._rate = _check_rate(update_rate)
        grouped: dict[int, list[float]] = {}
        for batch, seconds in samples:
            if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
                raise ValueError(f"batch sizes must be positive integers, got {batch!r}")
            grouped.setdefault(batch, []).append(_check_time(seconds, "seconds"))
        if len(grouped) < 2:
            raise ValueError("a GPU sweep needs samples at two or more distinct batch sizes")
        self._batches = sorted(grouped)
        self._seconds = [sum(grouped[b]) / len(grouped[b]) for b in self._batches]
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
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
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
