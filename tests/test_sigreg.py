"""SIGReg: the Epps–Pulley quadrature against scipy, the fast path against the direct formula,
behaviour on degenerate inputs, directions and the step counter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from lejepa.profiling import peak_allocated_bytes
from lejepa.sigreg import SIGReg, epps_pulley, epps_pulley_direct, sample_directions

N = 512
_RNG = np.random.default_rng(0)
SAMPLES = {
    "gaussian": _RNG.standard_normal(N),
    "scaled_gaussian": 2.5 * _RNG.standard_normal(N),
    "uniform": _RNG.uniform(-math.sqrt(3), math.sqrt(3), N),
    "constant": np.full(N, 0.7),
    "bimodal": np.where(_RNG.random(N) < 0.5, -2.0, 2.0) + 0.3 * _RNG.standard_normal(N),
}


def continuous_ep(x: np.ndarray, t_max: float = 3.0) -> float:
    """N ∫_{−t_max}^{t_max} |φ̂(t) − φ(t)|² φ(t) dt by adaptive quadrature (numpy only)."""

    def integrand(t: float) -> float:
        phi = math.exp(-t * t / 2)
        return abs(np.exp(1j * t * x).mean() - phi) ** 2 * phi

    value, _ = quad(integrand, -t_max, t_max, epsabs=1e-13, epsrel=1e-12, limit=500)
    return len(x) * value


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_quadrature_matches_continuous_integral(name):
    """The [0, t_max] rule with weights dt, 2dt, …, dt is the symmetric trapezoid rule on
    [−t_max, t_max], so it converges to the full integral (no factor 1/2) as O(dt²).

    17 knots must agree with scipy within the trapezoid error, estimated by Richardson as
    (4/3)|EP₁₇ − EP₃₃| (allowing 25 % slack); 2049 knots (error ×(1/128)²) to 1e-6.
    """
    x = torch.tensor(SAMPLES[name])[:, None]
    exact = continuous_ep(SAMPLES[name])
    ep17, ep33 = epps_pulley(x).item(), epps_pulley(x, knots=33).item()
    error_estimate = 4 / 3 * abs(ep17 - ep33)
    assert abs(ep17 - exact) <= 1.25 * error_estimate + 1e-12 * exact
    assert epps_pulley(x, knots=2049).item() == pytest.approx(exact, rel=1e-6)


SHAPES = [(256, 64), (3, 100, 37), (2, 4, 33, 5), (2, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, rtol, grad_rtol", [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-5, 1e-4)])
def test_value_and_gradient_match_direct_formula(shape, dtype, rtol, grad_rtol):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 1.2 + 0.1
    upstream = torch.randn(shape[:-2] + shape[-1:], generator=gen, dtype=dtype)
    fast_x, direct_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast, direct = epps_pulley(fast_x), epps_pulley_direct(direct_x)
    (fast * upstream).sum().backward()
    (direct * upstream).sum().backward()
    assert fast.shape == direct.shape == upstream.shape
    torch.testing.assert_close(fast, direct, rtol=rtol, atol=0)
    scale = direct_x.grad.abs().max()
    torch.testing.assert_close(fast_x.grad, direct_x.grad, rtol=0, atol=grad_rtol * scale)


def test_sigreg_is_mean_of_sliced_statistic_over_views():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(3, 64, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    a = sample_directions(16, 32, seed=5, dtype=torch.float64)
    loss = SIGReg(num_slices=32, knots=9, t_max=4.0)(z, directions=a)
    reference = epps_pulley_direct(z @ a, t_max=4.0, knots=9).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(loss, z)
    (ref_grad,) = torch.autograd.grad(reference, z)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_collapsed_column_scores_0_40_n():
    expected, _ = quad(lambda t: (1 - math.exp(-t * t / 2)) ** 2 * math.exp(-t * t / 2), -3, 3)
    assert expected == pytest.approx(0.402, abs=1e-3)
    for n in (64, 512):
        ep = epps_pulley(torch.zeros(n, 3)) / n
        torch.testing.assert_close(ep, torch.full((3,), expected), rtol=1e-3, atol=0)


def test_half_collapsed_embeddings_score_far_above_gaussian():
    """Zeroing half of 64 dims gives slices ~ N(0, ½): EP ≈ N·∫(e^{−t²/4} − φ)²φ ≈ 0.049·N (+≈1)."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(N, 64, generator=gen)
    half = z.clone()
    half[:, 32:] = 0
    sigreg = SIGReg(num_slices=1024).eval()
    gaussian, collapsed = sigreg(z).item(), sigreg(half).item()
    population, _ = quad(lambda t: (math.exp(-t * t / 4) - math.exp(-t * t / 2)) ** 2 * math.exp(-t * t / 2), -3, 3)
    assert 0.5 < gaussian < 2.0
    assert collapsed > 10 * gaussian
    assert N * population < collapsed < N * population + 4


@pytest.mark.parametrize("n, scale", [(64, 1e4), (2, 1.0), (2, 1e4)])
def test_finite_value_and_bounded_gradient(n, scale):
    """|∂EP/∂x_j| ≤ 2 Σ_k w_k φ_k t_k |φ̂(t_k) − φ_k| ≤ 2 Σ_k w_k φ_k t_k (1 + φ_k)."""
    x = (torch.randn(n, 16, generator=torch.Generator().manual_seed(4)) * scale).requires_grad_()
    ep = epps_pulley(x)
    ep.sum().backward()
    t = torch.linspace(0, 3, 17, dtype=torch.float64)
    w = torch.full_like(t, 2 * 3 / 16)
    w[0] = w[-1] = 3 / 16
    phi = torch.exp(-t * t / 2)
    bound = float(2 * (w * phi * t * (1 + phi)).sum())
    assert torch.isfinite(ep).all() and (ep >= 0).all()
    assert (ep <= n * float((w * phi * (1 + phi) ** 2).sum()) + 1e-3).all()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() <= bound


def test_low_precision_inputs_accumulate_in_float32():
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(2, 128, 32, generator=gen)
    a = sample_directions(32, 64, seed=0)
    sigreg = SIGReg(num_slices=64)
    full = sigreg(z, directions=a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = sigreg(z, directions=a)
    from_bf16 = sigreg(z.bfloat16(), directions=a.bfloat16())
    assert autocast.dtype == from_bf16.dtype == torch.float32
    torch.testing.assert_close(autocast, full, rtol=1e-6, atol=0)
    torch.testing.assert_close(from_bf16, full, rtol=2e-2, atol=0)


def test_directions_follow_the_step_counter():
    a = sample_directions(24, 100, seed=7)
    assert a.shape == (24, 100)
    torch.testing.assert_close(a.norm(dim=0), torch.ones(100))
    torch.testing.assert_close(a, sample_directions(24, 100, seed=7), rtol=0, atol=0)
    assert not torch.equal(a, sample_directions(24, 100, seed=8))

    z = torch.randn(64, 24, generator=torch.Generator().manual_seed(8))
    sigreg = SIGReg(num_slices=100)
    first, second = sigreg(z), sigreg(z)
    assert int(sigreg.step) == 2 and first != second
    torch.testing.assert_close(first, sigreg(z, directions=sample_directions(24, 100, 0)))

    restored = SIGReg(num_slices=100)
    restored.load_state_dict(sigreg.state_dict())
    restored.eval()
    assert restored(z) == restored(z) == sigreg(z)
    assert int(restored.step) == 2 and int(sigreg.step) == 3


def test_never_materialises_a_per_knot_tensor():
    """Peak forward + backward memory per byte of x: the direct formula holds x·t_k for all 17
    knots (≥ 17), the fast path little more than x's gradient (≤ 3)."""

    def peak_per_input_byte(fn, shape) -> float:
        x = torch.randn(shape, requires_grad=True)
        return peak_allocated_bytes(lambda: fn(x).sum().backward()) / (x.numel() * 4)

    assert peak_per_input_byte(epps_pulley_direct, (2, 128, 256)) >= 17
    assert peak_per_input_byte(epps_pulley, (8, 256, 1024)) <= 3


@pytest.mark.parametrize(
    "call",
    [
        lambda: epps_pulley(torch.randn(5)),
        lambda: epps_pulley(torch.randn(0, 3)),
        lambda: epps_pulley(torch.ones(4, 3, dtype=torch.long)),
        lambda: epps_pulley(torch.randn(4, 3), knots=1),
        lambda: epps_pulley(torch.randn(4, 3), t_max=0.0),
        lambda: SIGReg(num_slices=0),
        lambda: SIGReg(num_slices=8)(torch.randn(4, 3), directions=torch.randn(5, 8)),
    ],
)
def test_bad_arguments_are_refused(call):
    with pytest.raises(ValueError):
        call()


def test_step_counter_is_mirrored_on_the_host_and_set_explicitly():
    """The step is read from a host copy (a CUDA buffer read would wait for the GPU every step);
    set_step and load_state_dict keep both in agreement."""
    z = torch.randn(64, 24, generator=torch.Generator().manual_seed(3))
    sigreg = SIGReg(num_slices=50)
    sigreg.set_step(7)
    torch.testing.assert_close(sigreg(z), SIGReg(num_slices=50)(z, directions=sample_directions(24, 50, 7)))
    assert int(sigreg.step) == 8
    loaded = SIGReg(num_slices=50)
    loaded.load_state_dict({"step": torch.tensor(41)})
    torch.testing.assert_close(loaded(z), sigreg(z, directions=sample_directions(24, 50, 41)))
    assert int(loaded.step) == 42


_TRITON_CHECK = """
import torch
from lejepa.sigreg import SIGReg, epps_pulley, epps_pulley_direct, sample_directions
g = torch.Generator().manual_seed(0)
worst = 0.0
for shape, knots in [((3, 50, 40), 17), ((2, 17, 33), 9), ((1, 64, 7), 13), ((2, 300, 5), 17), ((1, 70, 130), 17)]:
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(shape[0], shape[2], generator=g)
    a = (epps_pulley(x, 3.0, knots, kernel="triton") * w).sum()
    (ga,) = torch.autograd.grad(a, x)
    b = (epps_pulley_direct(x.double(), 3.0, knots) * w.double()).sum()
    (gb,) = torch.autograd.grad(b, x)
    worst = max(worst, float((a.detach() - b.detach()).abs() / b.detach().abs()),
                float((ga - gb).abs().max() / gb.abs().max()))
z = torch.randn(4, 64, 16, generator=g)
d = sample_directions(16, 128, 3)
same = float((SIGReg(128, kernel="triton")(z, directions=d) - SIGReg(128)(z, directions=d)).abs())
print(worst, same)
"""


def test_triton_kernels_match_the_direct_formula_under_the_interpreter():
    """loss.kernel=triton: the fused forward and backward kernels, run by Triton's interpreter on
    the CPU (TRITON_INTERPRET=1), against the direct formula in float64 (values and gradients,
    knot counts whose P is and is not a power of two, N not a multiple of the block)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from helpers import REPO

    done = subprocess.run(
        [sys.executable, "-c", _TRITON_CHECK],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    worst, same = map(float, done.stdout.split())
    assert worst < 1e-5 and same < 1e-5
