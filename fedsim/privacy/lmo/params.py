"""LMO noise parameters: the law of the random Laplace rate t, its MGF and moments, the
closed-form noise density, and the quadrature nodes every integral over it uses.

The unit-sensitivity noise Laplace(0, 1/t) has the mixture density ``p(z) = E_t[(t/2) exp(-t|z|)]``.
With ``m(w) = E[exp(-w t)] = M(-w)`` (``M`` the MGF of t, the product of the three component
MGFs at ``a1 s, a3 s, a4 s``) it is ``p(z) = -(1/2) m'(|z|)``: no numerical integration over t.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping

import attr
import numpy as np
from scipy import integrate

PARAM_NAMES = ("a1", "a3", "a4", "G_k", "G_theta", "E_lambda", "U_a", "U_b")


def _log_expm1_over_x(y: np.ndarray) -> np.ndarray:
    """log((e^y - 1) / y), stable for all real y (0 at y = 0)."""
    y = np.asarray(y, dtype=float)
    out = np.empty_like(y)
    small = np.abs(y) < 1e-6
    pos = (y > 0) & ~small
    neg = (y < 0) & ~small
    out[small] = y[small] / 2 + y[small] ** 2 / 24
    out[pos] = y[pos] + np.log(-np.expm1(-y[pos])) - np.log(y[pos])
    out[neg] = np.log(-np.expm1(y[neg])) - np.log(-y[neg])
    return out


def _series_below(cut: float, series, closed):
    """f(x) for x >= 0: `series(x)` (a Taylor polynomial) for x < cut, else `closed(x)`."""
    def f(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        out = np.empty_like(x)
        small = x < cut
        out[small] = series(x[small])
        with np.errstate(over="ignore"):
            out[~small] = closed(x[~small])
        return out
    return f


#: phi(x) = 1/x - 1/(e^x - 1), in (0, 1/2]; phi(0) = 1/2.
_phi = _series_below(1e-3, lambda x: 0.5 - x / 12 + x**3 / 720, lambda x: 1.0 / x - 1.0 / np.expm1(x))
#: phi'(x) = 1/(4 sinh^2(x/2)) - 1/x^2, in [-1/12, 0).
_dphi = _series_below(1e-2, lambda x: -1.0 / 12 + x**2 / 240 - x**4 / 6048,
                      lambda x: 1.0 / (4.0 * np.sinh(x / 2) ** 2) - 1.0 / x**2)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LmoParams:
    """Unit-sensitivity LMO noise parameters, named as in the paper's code.

    ``t = a1*Gamma(G_k, scale G_theta) + a3*Exponential(rate E_lambda) + a4*Uniform(U_a, U_b)``,
    noise Laplace(0, 1/t). ``E_lambda`` is a *rate* (mean 1/E_lambda), as the paper's MGF
    assumes; the paper's sampler passes it to numpy as a scale.
    """

    a1: float
    a3: float
    a4: float
    G_k: float
    G_theta: float
    E_lambda: float
    U_a: float
    U_b: float

    def __attrs_post_init__(self):
        for name in PARAM_NAMES:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"lmo.{name} must be a finite number, got {v!r}")
        for name in ("a1", "a3", "a4"):
            if getattr(self, name) < 0:
                raise ValueError(f"lmo.{name} (a mixing weight) must be >= 0, got {getattr(self, name)!r}")
        if self.a1 == 0 and self.a3 == 0 and self.a4 == 0:
            raise ValueError("lmo.a1, lmo.a3 and lmo.a4 are all 0: the noise rate t would be 0 (infinite noise)")
        for name in ("G_k", "G_theta", "E_lambda"):
            if not getattr(self, name) > 0:
                raise ValueError(f"lmo.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.U_a >= 0:
            raise ValueError(f"lmo.U_a must be >= 0 (t must be non-negative), got {self.U_a!r}")
        if not self.U_b > self.U_a:
            raise ValueError(f"lmo.U_b must be > lmo.U_a, got U_a={self.U_a!r}, U_b={self.U_b!r}")

    @classmethod
    def from_dict(cls, d: Mapping, *, strict: bool = True) -> "LmoParams":
        """From a mapping with the 8 parameter keys. `strict=False` ignores other keys
        (the paper's JSON files also carry "distributions" and "delta")."""
        if not isinstance(d, Mapping):
            raise ValueError(f"LMO parameters must be a mapping, got {type(d).__name__}")
        missing = [k for k in PARAM_NAMES if k not in d]
        if missing:
            raise ValueError(f"LMO parameters miss {', '.join(missing)}")
        extra = sorted(set(d) - set(PARAM_NAMES))
        if extra and strict:
            raise ValueError(f"unknown LMO parameter(s) {', '.join(extra)}; expected {', '.join(PARAM_NAMES)}")
        for k in PARAM_NAMES:
            if isinstance(d[k], bool) or not isinstance(d[k], numbers.Real):
                raise ValueError(f"lmo.{k} must be a number, got {d[k]!r}")
        return cls(**{k: float(d[k]) for k in PARAM_NAMES})

    def to_dict(self) -> dict:
        return {k: float(getattr(self, k)) for k in PARAM_NAMES}

    def scaled(self, c: float) -> "LmoParams":
        """The params with t replaced by c*t (noise divided by c): a1, a3, a4 times c."""
        if not (c > 0 and math.isfinite(c)):
            raise ValueError(f"scale must be positive and finite, got {c!r}")
        return attr.evolve(self, a1=self.a1 * c, a3=self.a3 * c, a4=self.a4 * c)

    # effective components: a1*Gamma(k, th) = Gamma(k, a1*th), a3*Exp(rate l) = Exp(rate l/a3),
    # a4*U(a, b) = U(a4*a, a4*b)
    _g_scale = property(lambda self: self.a1 * self.G_theta)
    _e_rate = property(lambda self: self.E_lambda / self.a3 if self.a3 > 0 else math.inf)
    _u_lo = property(lambda self: self.a4 * self.U_a)
    _u_width = property(lambda self: self.a4 * (self.U_b - self.U_a))

    def log_mgf_array(self, s) -> np.ndarray:
        """log E[exp(s t)] elementwise; +inf where the MGF diverges (s*a1*G_theta >= 1 or s*a3 >= E_lambda)."""
        s = np.asarray(s, dtype=float)
        out = np.zeros_like(s)
        bad = np.zeros(s.shape, dtype=bool)
        if self.a1 > 0:
            x = self._g_scale * s
            bad |= x >= 1
            out -= self.G_k * np.log1p(-np.where(x >= 1, 0.0, x))
        if self.a3 > 0:
            y = self.a3 * s / self.E_lambda
            bad |= y >= 1
            out -= np.log1p(-np.where(y >= 1, 0.0, y))
        if self.a4 > 0:
            out += s * self._u_lo + _log_expm1_over_x(s * self._u_width)
        return np.where(bad, np.inf, out)

    def log_mgf(self, s: float) -> float:
        return float(self.log_mgf_array(np.array([float(s)]))[0])

    def mean_t(self) -> float:
        return self.a1 * self.G_k * self.G_theta + self.a3 / self.E_lambda + self.a4 * (self.U_a + self.U_b) / 2

    def var_t(self) -> float:
        return (self.a1**2 * self.G_k * self.G_theta**2 + (self.a3 / self.E_lambda) ** 2
                + self.a4**2 * (self.U_b - self.U_a) ** 2 / 12)

    def tail_exponent(self) -> float:
        """p such that m(w) = E[e^{-wt}] ~ w^{-p} as w -> inf (inf: t bounded away from 0): E[t^{-n}]
        and E|noise|^n are finite iff p > n."""
        if self.a4 > 0 and self.U_a > 0:
            return math.inf
        return (self.G_k if self.a1 > 0 else 0.0) + (self.a3 > 0) + (self.a4 > 0)  # Gamma: G_k, Exp and U: 1 each

    @functools.lru_cache(maxsize=4096)  # noqa: B019 (params are few and small)
    def inverse_moment(self, n: int) -> float:
        """E[t^{-n}] = (1/Gamma(n)) int_0^inf w^{n-1} m(w) dw (inf when the tail exponent <= n), by
        Gauss-Legendre on geometric panels up to W = 1e10/E[t] plus the tail beyond W bounded through
        the local decay exponent p(W) = W g(W) (it only grows with w, so m(w) <= m(W) (W/w)^p(W))."""
        n = int(n)
        if n < 1:
            raise ValueError("n must be >= 1")
        if self.tail_exponent() <= n:
            return math.inf
        w, wt = _halfline_nodes(1.0 / self.mean_t())
        body = float(np.sum(wt * np.exp((n - 1) * np.log(np.maximum(w, 1e-300)) + self._log_m(w))))
        big_w = float(w[-1])
        p_loc = float(big_w * self._g(np.array([big_w]))[0])
        if p_loc > n + 0.05:
            tail = math.exp(n * math.log(big_w) + float(self._log_m(np.array([big_w]))[0])) / (p_loc - n)
        else:  # not yet in the asymptotic regime: adaptive quadrature of the tail
            f = lambda x: math.exp((n - 1) * math.log(x) + float(self._log_m(np.array([x]))[0]))  # noqa: E731
            tail = integrate.quad(f, big_w, math.inf, limit=400, epsabs=0, epsrel=1e-10)[0]
        return (body + tail) / math.gamma(n)

    def noise_variance(self) -> float:
        """Per-coordinate variance of the unit-sensitivity noise Laplace(0, 1/t): E[2/t^2] (may be inf)."""
        return 2.0 * self.inverse_moment(2)

    def noise_std(self) -> float:
        return math.sqrt(self.noise_variance())

    def expected_magnitude(self) -> float:
        """E|noise| = E[1/t] (unit sensitivity; may be inf)."""
        return self.inverse_moment(1)

    def usefulness(self, gamma: float) -> float:
        """P(|noise| <= gamma) = E[1 - exp(-gamma t)] = 1 - M(-gamma) (the paper's 'usefulness')."""
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        return float(-math.expm1(self.log_mgf(-gamma)))

    @functools.lru_cache(maxsize=4096)  # noqa: B019
    def fisher_information(self) -> float:
        """Fisher information of the location family p(z - u): int p'^2 / p (finite: p' is bounded by E[t^2]/2)."""
        w, wt = _halfline_nodes(1.0 / self.mean_t())
        return float(2.0 * np.sum(wt * np.exp(self.log_density_abs(w)) * self.score_abs(w) ** 2))

    def _log_m(self, w: np.ndarray) -> np.ndarray:
        """log m(w) = log E[e^{-w t}] for w >= 0."""
        w = np.asarray(w, dtype=float)
        out = np.zeros_like(w)
        if self.a1 > 0:
            out -= self.G_k * np.log1p(self._g_scale * w)
        if self.a3 > 0:
            out -= np.log1p(w / self._e_rate)
        if self.a4 > 0:
            out += -self._u_lo * w + _log_expm1_over_x(-self._u_width * w)
        return out

    def _g(self, w: np.ndarray, derivative: bool = False) -> np.ndarray:
        """g(w) = -(log m)'(w) = E[t e^{-wt}] / E[e^{-wt}] > 0, or g'(w) if `derivative`."""
        w = np.asarray(w, dtype=float)
        out = np.zeros_like(w)
        n, sign = (2, -1.0) if derivative else (1, 1.0)  # (b/(1+bw))' = -b^2/(1+bw)^2, (1/(r+w))' = -1/(r+w)^2
        if self.a1 > 0:
            b = self._g_scale
            out += sign * self.G_k * b**n / (1 + b * w) ** n
        if self.a3 > 0:
            out += sign / (self._e_rate + w) ** n
        if self.a4 > 0:
            uw = self._u_width
            out += uw**2 * _dphi(uw * w) if derivative else self._u_lo + uw * _phi(uw * w)
        return out

    def log_density_abs(self, w: np.ndarray) -> np.ndarray:
        """log p at |z| = w >= 0: p(z) = (1/2) m(|z|) g(|z|) = (1/2) E[t e^{-t|z|}]."""
        w = np.asarray(w, dtype=float)
        return math.log(0.5) + self._log_m(w) + np.log(self._g(w))

    def density(self, z) -> np.ndarray:
        """The unit-sensitivity noise density p(z) = E_t[(t/2) exp(-t|z|)]."""
        return np.exp(self.log_density_abs(np.abs(np.asarray(z, dtype=float))))

    def score_abs(self, w: np.ndarray) -> np.ndarray:
        """d/dw log p(w) for w > 0 (= -g + g'/g)."""
        g = self._g(w)
        return -g + self._g(w, derivative=True) / g


# -- quadrature nodes -------------------------------------------------------------------------

_GL_X, _GL_W = np.polynomial.legendre.leggauss(12)


def _panel_nodes(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = edges[:-1], edges[1:]
    mid, half = (a + b) / 2, (b - a) / 2
    return (mid[:, None] + half[:, None] * _GL_X[None, :]).ravel(), (half[:, None] * _GL_W[None, :]).ravel()


@functools.lru_cache(maxsize=64)
def _halfline_nodes(scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre on geometric panels covering [0, 1e10*scale] (integrands here decay
    at least like w^{-(p+2)} with p the tail exponent, or exponentially)."""
    lo, hi = 1e-7 * scale, 1e10 * scale
    n = int(math.ceil(math.log2(hi / lo))) + 1
    return _panel_nodes(np.concatenate([[0.0], np.geomspace(lo, hi, n)]))


def _interval_nodes(u: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes on [0, u], geometric panels refined toward both ends (kinks of the integrand)."""
    lo = 1e-6 * min(u / 2, scale)
    left = np.concatenate([[0.0], np.geomspace(lo, u / 2, max(2, int(math.ceil(math.log2((u / 2) / lo))) + 1))])
    return _panel_nodes(np.concatenate([left, (u - left[::-1])[1:]]))
