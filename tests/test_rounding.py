"""Stochastic rounding (`rounding=stochastic`): unbiased, seeded, only ever the two neighbouring levels; nearest
rounding unchanged; the GMSE split into bias and variance."""
import pytest
import torch

from capscale.capacity import SpecError, gmse, parse
from capscale.capacity.gmse import error_split

UNBIASED = ["int4(scale=absmax,rounding=stochastic)", "fp4_e2m1(scale=absmax,rounding=stochastic)",
            "mxfp4(rounding=stochastic)", "nvfp4(rounding=stochastic)"]


@pytest.mark.parametrize("spec", UNBIASED)
def test_stochastic_rounding_is_unbiased(spec):
    """The mean of many draws equals the input within Monte Carlo error, entry by entry (MX's floor power-of-two
    scale would clip the largest values of each block and fail this by ~40 standard errors)."""
    fmt = parse(spec)
    x = torch.randn(4, 64) * 3
    draws = torch.stack([fmt(x) for _ in range(3000)])
    error, se = draws.mean(0) - x, draws.std(0) / 3000 ** 0.5
    assert (error.abs() <= 5 * se + 1e-5 * x.abs().max()).all()  # an entry on a level (the absmax) has se 0
    assert (error / se.clamp_min(1e-3)).mean().abs() < 0.3


@pytest.mark.parametrize("spec", UNBIASED)
def test_stochastic_rounding_is_seeded(spec):
    fmt, x = parse(spec), torch.randn(8, 64)
    torch.manual_seed(3)
    a = fmt(x)
    torch.manual_seed(3)
    assert torch.equal(a, fmt(x))
    assert not torch.equal(a, fmt(x))  # a new draw


@pytest.mark.parametrize("spec", UNBIASED[:2])
def test_stochastic_rounding_takes_one_of_the_two_levels_around_each_value(spec):
    """With an absmax scale (the same as nearest rounding's), each draw is the nearest level or the one on the
    other side of x."""
    fmt, nearest = parse(spec), parse(spec.replace(",rounding=stochastic", ""))
    x = torch.randn(8, 64)
    n = nearest(x)
    for _ in range(20):
        a = fmt(x)
        assert ((a == n) | ((a - x) * (n - x) <= 0)).all()


def test_nearest_rounding_is_unchanged_and_named_as_before():
    x = torch.randn(16, 128)
    assert str(parse("int4(rounding=nearest)")) == "int4"
    assert torch.equal(parse("mxfp4")(x), parse("mxfp4(rounding=nearest)")(x))
    with pytest.raises(SpecError, match="rounding must be"):
        parse("int4(rounding=up)")
    with pytest.raises(SpecError, match="Monte Carlo"):
        gmse("int4(rounding=stochastic)", exact=True)


def test_error_split_tells_bias_from_variance():
    nearest = error_split("mxfp4", samples=1 << 17)
    assert nearest.variance == 0 and nearest.bias_sq == pytest.approx(nearest.gmse, rel=1e-6)
    stochastic = error_split("mxfp4(rounding=stochastic)", samples=1 << 17)
    assert stochastic.bias_sq < 0.02 * stochastic.gmse
    assert stochastic.variance == pytest.approx(stochastic.gmse, rel=0.03)
    assert stochastic.gmse > nearest.gmse  # the price of unbiasedness: about twice the MSE
    assert error_split("mxfp4(rounding=stochastic)", samples=1 << 17) == stochastic  # seeded
    clipped = error_split("int4(rounding=stochastic)", samples=1 << 17)  # the rms scale clips the tails: a bias
    assert clipped.bias_sq > 0.005 * clipped.gmse


def test_a_group_whose_scale_is_stored_as_zero_quantizes_to_zeros():
    """Gradient-sized values (1e-9) underflow an fp16 group scale, and an all-zero group has scale 0: both must
    store zeros. (Rounding them at a stand-in scale 1 wrote +-0.5 into gradients and broke a backward study.)"""
    x = torch.randn(4, 16) * 1e-9
    x[0] = 0
    for spec in ("int8(group=8,scale=absmax)", "int4(group=8,scale=absmax,rounding=stochastic)"):
        assert torch.equal(parse(spec)(x), torch.zeros_like(x))
    assert torch.equal(parse("int4")(torch.zeros(2, 8)), torch.zeros(2, 8))  # all-zero rows, fp32 row scale
    kept = parse("int8(group=8,scale=absmax,scale_format=fp32)")(x)  # an fp32 scale keeps them: error <= half a step
    assert ((kept - x).abs() <= x.abs().reshape(-1, 8).amax(1).repeat_interleave(8).reshape(4, 16) / 255 + 1e-15).all()
