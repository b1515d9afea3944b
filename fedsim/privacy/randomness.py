"""Where every secret random bit of a run comes from.

Three draws must be unknown to anyone who sees the run's outputs and configuration: the ULS
cohort (Poisson user sampling), the ELS batch (Poisson example sampling) and the noise.
Amplification by subsampling assumes the adversary cannot tell who was sampled, and subtracting
a predictable noise vector from a release recovers the clipped sum exactly. All of them (the
list below, with adaptive clipping's count noise and the audit's canary coins) are drawn here,
and nowhere else.

The generator
-------------
`SecretRandomness` holds one 256-bit master key:

* secure mode (the default, ``dp.reproducible: false``): 32 bytes of OS entropy (`os.urandom`,
  the kernel CSPRNG), fresh in every process and never written anywhere: a resumed run draws
  new cohorts and new noise, so a re-done round is a new release (the ledger counts it again);
* reproducible mode (``dp.reproducible: true``, tests and debugging only, never real data):
  SHA-256 of a label and ``run.seed``. Anyone who reads ``config.yaml`` can regenerate every
  cohort and every noise vector: the reported epsilon does not hold.

Every secret draw of a run, by purpose (the step is the round or ELS step):

* ``uls-cohort``: the ULS cohort (Poisson; with banded MF, Poisson within the round's group),
  `fedsim/sampling.py`;
* ``els-sample``: the ELS batch of examples, `fedsim/sampling.py`;
* ``uls-noise`` / ``els-noise``: the mechanism's noise on the clipped sum (Gaussian, LMO, or the
  fresh z_t of banded MF's correlated noise), `privacy/mechanisms.py`, `privacy/banded_mf.py`;
* ``uls-clip-count-noise`` / ``els-clip-count-noise``: adaptive clipping's noise on the count
  of unclipped contributions, `privacy/adaptive_clipping.py`;
* ``audit-inclusion``: `fedsim audit`'s secret coin per canary, `auditing/canaries.py`.

Every draw has a *purpose* and a *step* (e.g. ``("uls-noise", 7)``). Its bits are the
AES-256-CTR keystream (OpenSSL, through the `cryptography` package) under the subkey
``HMAC-SHA256(master, purpose || step)``. AES-256-CTR is a standard CSPRNG construction
(NIST SP 800-90A's CTR_DRBG is built on it) and measured about twice as fast as ChaCha20 here
(4.1 vs 2.1 GB/s): the keystream costs under 2 ns of the ~20 ns per Gaussian. A draw is a pure
function of (key, purpose, step): a resumed reproducible run re-draws exactly the cohort and
noise of the round it re-does, and no generator state needs a checkpoint.

Conversions
-----------
* uniforms on [0, 1): the top 53 bits of a 64-bit word, times 2^-53, in float64 (every double
  of the grid k 2^-53 equally likely);
* uniforms on (0, 1) for logarithms (`uniform_open`): (hi + 1/2) 2^-53, the midpoints of the
  53-bit grid, refined where they are coarse: when hi < 2^20 (probability 2^-33) a second word
  lo subdivides the cell, u = (hi + (lo + 1/2) 2^-53) 2^-53. Near 0 a one-word uniform is
  coarse (its smallest values are 2^-53, 2 2^-53, ...), so -ln u would take a few widely
  spaced values in the far tail: Box-Muller radii on discrete rings coarser than the rounding
  grid below beyond ~7.4 sigma, where a neighbouring dataset's output has probability zero.
  Refined, the relative spacing of the attainable u is at most 2^-20 down to u = 2^-86, and
  the rings stay finer than the grid out to |z| ~ 11 (beyond it: probability 2^-92);
* Poisson sampling: member i is in the sample iff its word w_i < floor(q 2^64), an exact
  Bernoulli(q') with q' = floor(q 2^64) / 2^64 <= q (the accountant's q is an upper bound on
  the rate that runs), in chunks, so memory does not grow with the population;
* Gaussians: Box-Muller in float64, r = sqrt(-2 ln u1) with u1 from `uniform_open` and the
  angle from a 53-bit uniform: the largest attainable |z| is sqrt(214 ln 2) = 12.18 (torch's
  float32 CPU sampler stops at 5.77, so there the two neighbouring outputs' supports differ,
  breaking delta). P(|z| > 12.18) = 4e-34 per coordinate;
* exponentials: -ln(u1); gammas: the inverse regularised incomplete gamma function of a
  53-bit uniform (scipy), exact up to float64 rounding.

Floating-point hardening
------------------------
`add_noise` adds the float64 noise to the float64 sum and rounds the result to a grid of
spacing ``2^(floor(log2 std) - 16)`` before casting back (post-processing: no privacy cost;
the rounding error is below 2^-17 std, a variance change of 1e-11). Mironov (2012) and Jin et
al. (2022, "Are We There Yet? Timing and Floating-Point Attacks on Differential Privacy
Systems") attack the *low-order bits* of ``x + noise``: which doubles a sampler can produce
depends on x there. The grid is 2^30 or more times coarser than a double's spacing at the
release's magnitude (for |x| < 2^20 std), so an output cell holds ~2^60 of the sampler's
outputs and its probability is the Gaussian measure of the cell to within a relative ~2^-40.
Opacus' secure mode instead sums four Gaussians of std/2 (Holohan and Braghin 2021), at four
times the cost; fedsim's snapping costs one rounding pass. What remains is stated in the
README (trust model).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import os

import numpy as np
import torch

#: words per chunk: bounds the transient memory of a draw (8 B per word) for any size
CHUNK_WORDS = 1 << 21
#: coordinates per chunk of `NoiseMechanism.add_noise`: its float64 temporaries (~2 MB) stay in
#: cache across the ~10 passes of a chunk (measured fastest of 2^16..2^21 here)
NOISE_CHUNK = 1 << 18
#: converted keystream words a stream reads ahead on a helper thread (`_top53`)
READ_AHEAD_WORDS = 1 << 18
_TWO53_INV = 2.0**-53
_LN2_106 = 106 * math.log(2)
_REFINE_BELOW = 2.0**20  # a 53-bit uniform's cell is refined below 2^20 2^-53 (relative spacing > 2^-20)
_ZEROS = np.zeros(8 * CHUNK_WORDS, dtype=np.uint8)  # the plaintext of every keystream
_ZEROS.setflags(write=False)
#: largest |z| the Box-Muller sampler can return: sqrt(-2 ln 2^-107), u1's smallest value
MAX_ABS_NORMAL = math.sqrt(214 * math.log(2))
#: the rounding grid is 2^-SNAP_BITS of the noise std (rounded down to a power of two)
SNAP_BITS = 16

_REPRODUCIBLE_LABEL = b"fedsim reproducible-mode key v1 (NOT SECRET: derived from run.seed)"


@functools.cache
def _reader():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedsim-keystream")


class RandomStream:
    """The keystream of one (purpose, step), consumed in order: uniform words and the conversions above.

    Read either as raw words (`words`, `bernoulli_indices`: the samplers) or as top 53 bits in
    floats (`_top53` and all built on it: the noise), never both. Floats are read ahead: while
    torch turns one block into Gaussians, a helper thread encrypts and converts the next (AES
    and numpy release the GIL; 1.6x faster on 2 cores), with the same values: one keystream."""

    def __init__(self, subkey: bytes):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._enc = Cipher(algorithms.AES(subkey), modes.CTR(b"\0" * 16)).encryptor()
        self._buf = np.zeros(0)  # converted words read ahead, not yet used
        self._next = None  # the helper's pending block (a Future), if any

    def words(self, n: int) -> np.ndarray:
        """n uniform 64-bit words (uint64): the keystream (AES-CTR encryption of zeros)."""
        if self._next is not None or self._buf.size:
            raise RuntimeError("a RandomStream is read either as words or as floats, never both")
        return self._raw_words(n)

    def _raw_words(self, n: int) -> np.ndarray:
        nbytes = 8 * int(n)
        out = np.empty(nbytes + 15, dtype=np.uint8)  # update_into wants block_size - 1 spare bytes
        done = 0
        while done < nbytes:  # through one shared, read-only block of zeros
            m = min(nbytes - done, _ZEROS.size)
            written = self._enc.update_into(_ZEROS[:m], out[done:done + m + 15])
            assert written == m
            done += m
        return out[:nbytes].view(np.uint64)

    def _convert(self, n: int) -> np.ndarray:
        # numpy's uint64 shift is logical and its conversion vectorised: ~5 ns a word here,
        # against ~15 for torch's int64 shift, mask and cast
        return (self._raw_words(n) >> np.uint64(11)).astype(np.float64)

    def _top53(self, n: int) -> torch.Tensor:
        """The top 53 bits of the next n words, as float64 integers in [0, 2^53)."""
        n = int(n)
        if n < READ_AHEAD_WORDS and self._next is None and not self._buf.size:
            return torch.from_numpy(self._convert(n))  # a small draw: no helper, no words wasted
        parts, have = [], 0
        while have < n:
            if not self._buf.size:
                if self._next is None:
                    self._next = _reader().submit(self._convert, READ_AHEAD_WORDS)
                self._buf = self._next.result()
                self._next = _reader().submit(self._convert, READ_AHEAD_WORDS)  # the block after
            take = min(n - have, self._buf.size)
            parts.append(self._buf[:take])
            self._buf = self._buf[take:]
            have += take
        return torch.from_numpy(parts[0].copy() if len(parts) == 1 else np.concatenate(parts))

    def uniform(self, n: int) -> torch.Tensor:
        """float64 uniforms on the grid {0, 2^-53, ..., 1 - 2^-53}: [0, 1)."""
        return self._top53(n).mul_(_TWO53_INV)

    def _open_units(self, n: int) -> torch.Tensor:
        """v = u 2^53 for n uniforms u on (0, 1), fine near 0 (see "Conversions"): hi + 1/2,
        and hi + (lo + 1/2) 2^-53 where hi < 2^20. Smallest value 2^-54: u >= 2^-107."""
        v = self._top53(n)
        coarse = torch.from_numpy(v.numpy() < _REFINE_BELOW)
        v.add_(0.5)
        k = int(coarse.sum())
        if k:  # rare (2^-33 a draw): refine those cells with one more word each
            v[coarse] = v[coarse].sub_(0.5).add_(self._top53(k).add_(0.5).mul_(_TWO53_INV))
        return v

    def uniform_open(self, n: int) -> torch.Tensor:
        """float64 uniforms on (0, 1), fine near 0: smallest value 2^-107, never 0 (safe under log)."""
        return self._open_units(n).mul_(_TWO53_INV)

    def normal(self, n: int) -> torch.Tensor:
        """n standard normals in float64 (Box-Muller; |z| <= 12.18)."""
        n = int(n)
        half = (n + 1) // 2
        # r = sqrt(-2 ln u1) = sqrt(106 ln 2 - 2 ln v), v = u1 2^53 (one pass fewer than scaling u1)
        r = self._open_units(half).log_().mul_(-2.0).add_(_LN2_106).sqrt_()
        theta = self._top53(half).mul_(2.0 * math.pi * _TWO53_INV)
        z = torch.empty(2 * half, dtype=torch.float64)
        torch.cos(theta, out=z[:half]).mul_(r)
        torch.sin(theta, out=z[half:]).mul_(r)
        return z[:n]

    def exponential(self, n: int) -> torch.Tensor:
        """n Exponential(rate 1) in float64: -ln u = 53 ln 2 - ln v, u in (0, 1)."""
        return self._open_units(n).log_().neg_().add_(53 * math.log(2))

    def gamma(self, shape: float, n: int) -> torch.Tensor:
        """n Gamma(shape, scale 1) in float64, by inversion of a 53-bit uniform."""
        from scipy.special import gammaincinv

        u = self.uniform_open(n).clamp_(max=1.0 - _TWO53_INV).numpy()  # (0, 1): finite quantiles
        return torch.from_numpy(gammaincinv(float(shape), u))

    def signs(self, n: int) -> torch.Tensor:
        """n independent fair signs (+1.0 / -1.0, float64): the top bit of a word."""
        return torch.where(self._top53(n) >= 2.0**52, -1.0, 1.0).double()

    def bernoulli_indices(self, n: int, q: float) -> np.ndarray:
        """Sorted indices i < n with word_i < floor(q 2^64): each independently with
        probability q' <= q (exact; q' = q up to 2^-64). O(n) words in fixed-size chunks."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"a sampling probability must be in [0, 1], got {q!r}")
        if q >= 1.0:
            return np.arange(n, dtype=np.int64)
        threshold = np.uint64(int(q * 2.0**64))  # q * 2^64 is exact in binary floating point; int() floors
        out = [np.flatnonzero(self.words(min(CHUNK_WORDS, int(n) - start)) < threshold) + start
               for start in range(0, int(n), CHUNK_WORDS)]
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


class SecretRandomness:
    """The run's one source of privacy-critical randomness (see the module docstring)."""

    def __init__(self, key: bytes, *, reproducible: bool):
        if len(key) < 32:
            raise ValueError("the master key must have at least 256 bits")
        self._key = bytes(key)
        self.reproducible = bool(reproducible)

    @classmethod
    def secure(cls) -> SecretRandomness:
        """A fresh 256-bit key from the OS CSPRNG; never stored."""
        return cls(os.urandom(32), reproducible=False)

    @classmethod
    def from_seed(cls, seed: int) -> SecretRandomness:
        """Reproducible mode: the key is a public function of `seed` (tests only)."""
        seed_bytes = int(seed).to_bytes(16, "little", signed=True)
        return cls(hashlib.sha256(_REPRODUCIBLE_LABEL + seed_bytes).digest(), reproducible=True)

    @classmethod
    def for_run(cls, reproducible: bool, seed: int) -> SecretRandomness:
        return cls.from_seed(seed) if reproducible else cls.secure()

    def stream(self, purpose: str, step: int) -> RandomStream:
        """The keystream of one draw: a pure function of (key, purpose, step)."""
        from fedsim.privacy import sabotage

        if purpose.endswith("-noise") and sabotage.active("reused-noise"):  # the audit's self-test only
            step = 0
        label = purpose.encode() + b"\0" + int(step).to_bytes(8, "little", signed=True)
        return RandomStream(hmac.new(self._key, label, hashlib.sha256).digest())

    @property
    def source(self) -> str:
        return "reproducible-seed" if self.reproducible else "os-entropy"

    def describe(self) -> dict:
        """What summary.json says about the secret draws (never the key)."""
        key = ("SHA-256 of run.seed: PUBLIC, anyone with config.yaml can regenerate every draw (not for real data)"
               if self.reproducible else "256 bits from os.urandom, fresh per process, never written")
        return {
            "source": self.source, "key": key,
            "generator": "AES-256-CTR keystream, subkey HMAC-SHA256(key, purpose, step)",
            "cohort_sampling": "exact Bernoulli(q) per user from 64-bit keystream words",
            "example_sampling": "exact Bernoulli(q) per kept example from 64-bit keystream words",
            "noise": "float64 Box-Muller, radius uniform refined near 0 (|z| up to 12.18 std), "
                     "rounded to a 2^-16 std grid",
            "public_seed_drives": "run.seed: model init, data split, ELS example cap, local batch order, dropout",
        }

    def __repr__(self) -> str:  # never print the key
        return f"SecretRandomness(source={self.source!r})"


def snap_to_grid(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Round x (float64, in place) to multiples of 2^(floor(log2 scale) - SNAP_BITS), `scale` a finite
    noise scale (the std): "Floating-point hardening" above. A power-of-two grid scales exactly."""
    if not (scale >= 0 and math.isfinite(scale)):
        raise ValueError(f"the rounding grid needs a finite noise scale, got {scale!r}")
    if scale > 0:
        grid = 2.0 ** (math.floor(math.log2(scale)) - SNAP_BITS)
        x.div_(grid).round_().mul_(grid)
    return x
