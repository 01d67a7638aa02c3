"""Power-law (Zipf) sampling of popularity ranks; NumPy only, so that benchmarks can use it anywhere."""

from __future__ import annotations

import numpy as np

_HEAD = 65_536  # ranks drawn from an exact table; rarer ranks from the continuous tail


class ZipfSampler:
    """Draws ranks in ``[0, n)`` with P(k) proportional to ``(k + 1)^-s``.

    The first ``_HEAD`` ranks come from an exact cumulative table; the tail's mass and its draws use the
    continuous density ``x^-s`` over ``[_HEAD + 0.5, n + 0.5)`` (the midpoint rule, accurate to well
    under 0.1% of the tail mass there), so memory is O(_HEAD) whatever ``n`` is.
    """

    def __init__(self, n: int, s: float):
        self.n, self.s = n, s
        head = min(n, _HEAD)
        w = np.arange(1, head + 1, dtype=np.float64) ** -s
        self._head_cdf = np.cumsum(w)
        head_mass = self._head_cdf[-1]
        self._a, self._b = head + 0.5, n + 0.5
        tail_mass = self._integral(self._a, self._b) if n > head else 0.0
        self._head_share = head_mass / (head_mass + tail_mass)
        self._head_cdf /= head_mass

    def _integral(self, a: float, b: float) -> float:
        if abs(self.s - 1.0) < 1e-12:
            return float(np.log(b / a))
        return float((b ** (1 - self.s) - a ** (1 - self.s)) / (1 - self.s))

    def probability_of_top(self, k: int) -> float:
        """The exact share of draws that land in the ``k`` most popular ranks (for tests and docs)."""
        k = min(k, self.n)
        head = len(self._head_cdf)
        if k <= head:
            return float(self._head_share * self._head_cdf[k - 1])
        tail_part = self._integral(self._a, k + 0.5) / self._integral(self._a, self._b)
        return float(self._head_share + (1 - self._head_share) * tail_part)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        u = rng.random(size)
        in_head = u < self._head_share
        out = np.empty(size, dtype=np.int64)
        out[in_head] = np.searchsorted(self._head_cdf, u[in_head] / self._head_share, side="right")
        v = (u[~in_head] - self._head_share) / (1 - self._head_share)
        if v.size:
            a, b, s = self._a, self._b, self.s
            if abs(s - 1.0) < 1e-12:
                x = a * (b / a) ** v
            else:
                x = (a ** (1 - s) + v * (b ** (1 - s) - a ** (1 - s))) ** (1 / (1 - s))
            out[~in_head] = np.clip(np.rint(x).astype(np.int64) - 1, len(self._head_cdf), self.n - 1)
        return np.minimum(out, self.n - 1)
