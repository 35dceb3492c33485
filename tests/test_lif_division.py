"""The GPU kernels' division by tau (csrc/lif_math.h, divide_by_tau_reciprocal): a times the
correctly rounded 1/tau, corrected by one exact residual, must give the correctly rounded a / tau
bit for bit, for every a (zeros, subnormals, infinities and NaN included) and every tau the ops
accept, in float32 and float64. `htakl::_lif_divide_by_tau` runs that very code on the CPU.

float32 is checked over every value of a binade of a (the quotient's rounding does not depend on
a's exponent inside the band the reciprocal form serves, so one binade holds every case a given tau
has, its nearest-to-a-tie quotients among them) and over random bit patterns of every exponent;
float64 over random significands and bit patterns, and quotients built next to a tie.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

import htakl_kernels  # noqa: F401  (loads the ops)

INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}

# tau just above 1 and just below 2 (significands of all ones and of a single one), small and long
# significands, the reference's default, large values, and values too large for 1/tau to be normal
# (float32 rounds 1e300 to infinity): those take the division.
TAUS = (1 + 2**-52, 1 + 2**-23, 2 - 2**-23, 1.25, 1.5, 1.7, 2.0, 3.0, math.pi, 10.0, 100.0 / 3,
        1e4, 2**20 + 1, 1e15, 1e30, 1e300)


def random_taus(count, seed):
    generator = random.Random(seed)
    return tuple(1 + generator.random() * 10 ** generator.uniform(-6, 6) for _ in range(count))


def divide(a, tau):
    return torch.ops.htakl._lif_divide_by_tau(a, tau)


def assert_bits_equal(a, tau):
    """The op's quotient against a / tau (a tensor division: torch turns a division by a scalar
    into a multiplication by its reciprocal), bit for bit, NaN included. tau is rounded to a's
    dtype as the op rounds it (1e300 to infinity in float32)."""
    got = divide(a, tau)
    want = a / torch.full_like(a, torch.tensor(tau, dtype=torch.float64).to(a.dtype).item())
    itype = INT_OF[a.dtype]
    mismatch = got.view(itype) != want.view(itype)
    if mismatch.any():
        where = mismatch.nonzero()[0].item()
        raise AssertionError(
            f"tau={tau!r} ({a.dtype}): {int(mismatch.sum())} of {a.numel()} quotients differ, "
            f"first a={a[where].item()!r}: got {got[where].item()!r}, want {want[where].item()!r}")


def specials(dtype, tau):
    """Zeros, infinities, NaN, the ends of the normal and subnormal ranges, and the neighbours of
    the reciprocal form's lower bound (tau 2^(min_exponent + digits + 4))."""
    info = torch.finfo(dtype)
    bound_exponent = {torch.float32: -125 + 24 + 4, torch.float64: -1021 + 53 + 4}[dtype]
    bound = torch.tensor(tau, dtype=dtype) * 2.0**bound_exponent
    near_bound = [bound]
    for direction in (0.0, math.inf):
        step = bound
        for _ in range(3):
            step = torch.nextafter(step, torch.tensor(direction, dtype=dtype))
            near_bound.append(step)
    values = torch.tensor([0.0, math.inf, math.nan, info.max, info.tiny, info.smallest_normal,
                           info.tiny * info.eps, 1.0, tau], dtype=dtype)
    values = torch.cat([values, torch.stack(near_bound)])
    return torch.cat([values, -values])


def random_bit_patterns(dtype, count, seed):
    generator = torch.Generator().manual_seed(seed)
    itype = INT_OF[dtype]
    info = torch.iinfo(itype)
    bits = torch.randint(info.min, info.max, (count,), generator=generator, dtype=itype)
    return bits.view(dtype)


def one_binade_float32():
    """Every float32 in [1, 2) and its negative."""
    ones = torch.tensor(1.0, dtype=torch.float32).view(torch.int32)
    binade = (ones + torch.arange(2**23, dtype=torch.int32)).view(torch.float32)
    return torch.cat([binade, -binade])


@pytest.mark.parametrize("tau", TAUS + random_taus(8, seed=1))
def test_float32_every_significand_and_random_bits(tau):
    assert_bits_equal(one_binade_float32(), tau)
    assert_bits_equal(random_bit_patterns(torch.float32, 1 << 20, seed=2), tau)
    assert_bits_equal(specials(torch.float32, tau), tau)


def near_tie_quotients(tau, count, seed):
    """float64 values a whose a / tau lies next to a tie: a is the double nearest to tau times
    the midpoint between two consecutive doubles q and q + ulp(q) (exact rational arithmetic),
    and its two neighbours."""
    generator = random.Random(seed)
    tau_exact = Fraction(tau)
    values = []
    top = min(60, 1020 - math.ceil(math.log2(tau)))  # a stays finite
    for _ in range(count):
        q = generator.uniform(1, 2) * 2.0 ** generator.randint(-60, top)
        midpoint = (Fraction(q) + Fraction(math.nextafter(q, math.inf))) / 2
        a = float(midpoint * tau_exact)  # correctly rounded
        values += [a, math.nextafter(a, 0.0), math.nextafter(a, math.inf)]
    a = torch.tensor(values, dtype=torch.float64)
    return torch.cat([a, -a])


def random_significands(dtype, count, seed):
    generator = torch.Generator().manual_seed(seed)
    significand = 1 + torch.rand(count, generator=generator, dtype=torch.float64)
    return significand.to(dtype)


@pytest.mark.parametrize("tau", TAUS + random_taus(8, seed=3))
def test_float64_random_and_near_ties(tau):
    assert_bits_equal(random_significands(torch.float64, 1 << 21, seed=4), tau)
    assert_bits_equal(random_bit_patterns(torch.float64, 1 << 20, seed=5), tau)
    assert_bits_equal(near_tie_quotients(tau, 2000, seed=6), tau)
    assert_bits_equal(specials(torch.float64, tau), tau)


def test_float32_near_ties_of_random_taus():
    """float32 significands of a at every value, over many random tau (the binade test's cases
    for other divisors)."""
    a = one_binade_float32()[: 2**23 : 7]
    for tau in random_taus(64, seed=7):
        assert_bits_equal(a, tau)


def test_refuses_what_the_ops_refuse():
    with pytest.raises(RuntimeError, match="tau must be a finite number > 1"):
        divide(torch.ones(3), 1.0)
    with pytest.raises(RuntimeError, match="a must be float32 or float64"):
        divide(torch.ones(3, dtype=torch.bfloat16), 2.0)
