"""SIGReg: the sliced Epps–Pulley Gaussianity regulariser of LeJEPA (docs/method.md §1).

For N samples x_j of a column, with φ̂(t) = (1/N) Σ_j e^{i t x_j} = c(t) + i s(t) and
φ(t) = e^{−t²/2}, the statistic is the trapezoid rule on t_k = k·dt, dt = t_max/(knots − 1):

    EP = N · Σ_k w_k φ(t_k) [(c(t_k) − φ(t_k))² + s(t_k)²],   w = dt, 2dt, …, 2dt, dt.

These weights are exactly the symmetric trapezoid rule on [−t_max, t_max] with 2·knots − 1
knots folded onto t ≥ 0 (the integrand is even), so EP ≈ N ∫_{−t_max}^{t_max} |φ̂ − φ|² φ dt,
with no factor 1/2. The t = 0 knot contributes exactly 0 and is skipped.

Speed and memory: the grid is uniform, so e^{i t_k x} = (e^{i dt x})^k: one cos/sin per sample,
then one complex multiply per knot (forward), and Horner's rule on the same powers for the
analytic gradient (backward, recomputed, nothing per knot stored). Work runs in blocks of
columns so temporaries stay small; nothing of shape (…, N, M, knots) ever exists. Everything
is accumulated in float32 (float64 for float64 input), under autocast too. The rotation's
rounding error grows by about one ulp per knot: at knot 16 its worst case is 1.7e-6 against
1.0e-6 for cos(t_k·x) computed directly in float32, too small to need re-anchoring.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

# Elements of one (rows, N, columns) block of complex temporaries: cache-sized on CPU.
_BLOCK_ELEMENTS = {"cpu": 1 << 18}
_BLOCK_ELEMENTS_DEFAULT = 1 << 24


def _check_grid(t_max: float, knots: int) -> None:
    if not t_max > 0:
        raise ValueError(f"t_max must be positive, got {t_max}")
    if int(knots) != knots or knots < 2:
        raise ValueError(f"knots must be an integer >= 2, got {knots}")


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    if not x.is_floating_point():
        raise ValueError(f"SIGReg needs a floating-point input, got {x.dtype}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grid(t_max: float, knots: int, device, dtype) -> tuple[Tensor, Tensor]:
    """φ(t_k) and w_k·φ(t_k) at the knots t_1..t_{knots−1} (t_0 = 0 dropped)."""
    dt = t_max / (knots - 1)
    t = torch.arange(1, knots, device=device, dtype=torch.float64) * dt
    phi = torch.exp(-0.5 * t * t)
    w = torch.full_like(t, 2 * dt)
    w[-1] = dt
    return phi.to(dtype), (w * phi).to(dtype)


def _blocks(rows: int, n: int, cols: int, budget: int):
    """(row slice, column slice) pairs covering a (rows, n, cols) tensor in blocks of ≲ budget."""
    width = max(1, min(cols, budget // n))
    height = max(1, min(rows, budget // (n * width)))
    for r in range(0, rows, height):
        for c in range(0, cols, width):
            yield slice(r, r + height), slice(c, c + width)


def _unit_phasor(angle: Tensor) -> Tensor:
    return torch.complex(torch.cos(angle), torch.sin(angle))


class _GridCharacteristic(torch.autograd.Function):
    """x (B, N, M) → view_as_real(φ̂(k·dt)) (B, powers, M, 2), k = 1..powers, mean over N.

    Backward: ∂c_k/∂x_j = −t_k sin(t_k x_j)/N and ∂s_k/∂x_j = t_k cos(t_k x_j)/N, so
    ∂L/∂x_j = Re Σ_k (t_k/N)·i·conj(g_k)·e^{i t_k x_j} with g_k = ∂L/∂c_k + i ∂L/∂s_k, a
    polynomial in e^{i dt x_j} evaluated by Horner's rule.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dt: float, powers: int) -> Tensor:
        rows, n, cols = x.shape
        ctype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        out = torch.empty(rows, powers, cols, dtype=ctype, device=x.device)
        budget = _BLOCK_ELEMENTS.get(x.device.type, _BLOCK_ELEMENTS_DEFAULT)
        for r, c in _blocks(rows, n, cols, budget):
            step = _unit_phasor(dt * x[r, :, c])
            power = step.clone()
            out[r, 0, c] = power.sum(dim=1)
            for k in range(1, powers):
                out[r, k, c] = power.mul_(step).sum(dim=1)
        ctx.save_for_backward(x)
        ctx.dt = dt
        return torch.view_as_real(out.div_(n))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        rows, n, cols = x.shape
        powers = grad.shape[1]
        t = torch.arange(1, powers + 1, device=x.device, dtype=x.dtype) * (ctx.dt / n)
        coef = 1j * torch.view_as_complex(grad.to(x.dtype).contiguous()).conj()
        coef = (coef * t[:, None]).unsqueeze(2)  # (B, powers, 1, M), broadcast over N
        grad_x = torch.empty_like(x)
        budget = _BLOCK_ELEMENTS.get(x.device.type, _BLOCK_ELEMENTS_DEFAULT)
        for r, c in _blocks(rows, n, cols, budget):
            step = _unit_phasor(ctx.dt * x[r, :, c])
            a = coef[r, :, :, c]
            horner = step * a[:, powers - 1]
            for k in range(powers - 2, -1, -1):
                horner.add_(a[:, k]).mul_(step)
            grad_x[r, :, c] = horner.real
        return grad_x, None, None


def _statistic(cf: Tensor, n: int, t_max: float, knots: int) -> Tensor:
    """EP (B, M) from view_as_real(φ̂) (B, knots−1, M, 2) at t_1.., with N = n samples."""
    phi, weight = _grid(t_max, knots, cf.device, cf.dtype)
    cos, sin = cf.unbind(-1)
    dev = (cos - phi[:, None]).square() + sin.square()
    return n * torch.einsum("bkm,k->bm", dev, weight)


KERNELS = ("torch", "triton")
"""Implementations of φ̂: ``torch`` (the rotation above, any device) and ``triton`` (two fused
kernels, :mod:`lejepa.sigreg_triton`; CUDA float32 only, needs the ``triton`` package)."""


def triton_available() -> bool:
    """Whether ``loss.kernel=triton`` can be imported here (the package; CUDA is checked by the caller)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _characteristic(x: Tensor, t_max: float, knots: int, kernel: str = "torch") -> Tensor:
    """φ̂ at t_1..t_{knots−1} as (B, knots−1, M, 2) for x (..., N, M), rows B = prod(...)."""
    _check_grid(t_max, knots)
    if x.dim() < 2 or x.shape[-2] == 0:
        raise ValueError(f"expected samples shaped (..., N, M) with N >= 1, got {tuple(x.shape)}")
    x = x.to(_accumulation_dtype(x)).reshape(-1, *x.shape[-2:])
    if kernel == "triton" and x.dtype == torch.float32:
        from lejepa.sigreg_triton import TritonCharacteristic

        return TritonCharacteristic.apply(x, t_max / (knots - 1), knots - 1)
    if kernel not in KERNELS:
        raise ValueError(f"unknown SIGReg kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    return _GridCharacteristic.apply(x, t_max / (knots - 1), knots - 1)


def epps_pulley(x: Tensor, t_max: float = 3.0, knots: int = 17, kernel: str = "torch") -> Tensor:
    """Epps–Pulley statistic of each column of x (..., N, M) against N(0, 1) → (..., M)."""
    cf = _characteristic(x, t_max, knots, kernel)
    return _statistic(cf, x.shape[-2], t_max, knots).reshape(*x.shape[:-2], x.shape[-1])


def epps_pulley_direct(x: Tensor, t_max: float = 3.0, knots: int = 17) -> Tensor:
    """Slow reference for :func:`epps_pulley`: materialises x·t_k for every knot (autograd)."""
    _check_grid(t_max, knots)
    t = torch.linspace(0, t_max, knots, device=x.device, dtype=x.dtype)
    dt = t_max / (knots - 1)
    w = torch.full_like(t, 2 * dt)
    w[0] = w[-1] = dt
    phi = torch.exp(-0.5 * t * t)
    xt = x.unsqueeze(-1) * t
    cos, sin = torch.cos(xt).mean(dim=-3), torch.sin(xt).mean(dim=-3)
    return x.shape[-2] * (((cos - phi).square() + sin.square()) @ (w * phi))


def sample_directions(dim: int, num_slices: int, seed: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Gaussian (dim, num_slices) matrix with unit-norm columns, a function of ``seed`` only.

    Drawn in float32 on ``device`` (same seed, same device type → same directions), then cast.
    """
    gen = torch.Generator(device=device).manual_seed(int(seed))
    a = torch.randn(dim, num_slices, generator=gen, device=device, dtype=torch.float32)
    return (a / a.norm(dim=0, keepdim=True)).to(dtype)


class _AllReduceMean(torch.autograd.Function):
    """Mean over ranks; its adjoint, the backward, is the same mean of the incoming gradients.

    Every rank's loss equals the global loss L, so each rank's backward yields world_size × its
    own share of ∂L/∂θ; DDP's averaging over ranks then gives exactly ∂L/∂θ on the global batch.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y.div_(dist.get_world_size())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        g = grad.clone()
        dist.all_reduce(g)
        return g.div_(dist.get_world_size())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SIGReg(nn.Module):
    """Sliced Epps–Pulley loss: z (..., N, K) → mean over leading dims and slices of EP(z·A).

    A is (K, num_slices), Gaussian with unit columns, drawn from a generator seeded with the
    ``step`` buffer (saved in state_dict); a training-mode call without ``directions`` advances
    ``step``, so directions are resampled at every training step and fixed in eval mode.
    Under torch.distributed (world size > 1), every rank uses the maximum ``step`` of all
    ranks, φ̂ is averaged over ranks (autograd-aware) and N is the global batch, so the value
    and the DDP-averaged gradients equal those of one process on the concatenated batch.
    Every rank must hold the same N. The counter is mirrored on the host, so a step on CUDA never
    waits for the GPU to read it: set it with :meth:`set_step` or ``load_state_dict``.
    """

    step: Tensor  # a registered buffer

    def __init__(self, num_slices: int = 1024, knots: int = 17, t_max: float = 3.0, kernel: str = "torch"):
        super().__init__()
        _check_grid(t_max, knots)
        if kernel not in KERNELS:
            raise ValueError(f"unknown SIGReg kernel {kernel!r}; choose from {', '.join(KERNELS)}")
        self.kernel = kernel
        if num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {num_slices}")
        self.num_slices, self.knots, self.t_max = int(num_slices), int(knots), float(t_max)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._host_step: int | None = 0  # the buffer's value on the host: reading a CUDA buffer waits for the GPU

    def set_step(self, step: int) -> None:
        """Set the step counter (the seed of the next directions); use this, not the buffer."""
        self.step.fill_(int(step))
        self._host_step = int(step)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_step = None  # read once from the loaded buffer

    def extra_repr(self) -> str:
        return f"num_slices={self.num_slices}, knots={self.knots}, t_max={self.t_max}, kernel={self.kernel}"

    def _agree(self, n: int, device) -> tuple[int, int]:
        """(step, global N) agreed over ranks with one MAX all-reduce; refuses unequal N."""
        if self._host_step is None:
            self._host_step = int(self.step)
        if not _distributed():
            return self._host_step, n
        buf = torch.tensor([self._host_step, n, -n], dtype=torch.long, device=device)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        step, n_max, n_min = int(buf[0]), int(buf[1]), -int(buf[2])
        if n_max != n_min:
            raise ValueError(
                f"SIGReg needs the same batch size on every rank, got {n_min} to {n_max} (drop the last incomplete batch)"
            )
        return step, n * dist.get_world_size()

    def forward(self, z: Tensor, directions: Tensor | None = None) -> Tensor:
        if z.dim() < 2:
            raise ValueError(f"SIGReg expects embeddings shaped (..., N, K), got {tuple(z.shape)}")
        dtype = _accumulation_dtype(z)
        step, n_global = self._agree(z.shape[-2], z.device)
        if directions is None:
            directions = sample_directions(z.shape[-1], self.num_slices, step, z.device, dtype)
            if self.training:
                self.step.fill_(step + 1)  # host to device: no wait
                self._host_step = step + 1
        elif directions.dim() != 2 or directions.shape[0] != z.shape[-1]:
            raise ValueError(f"directions must be shaped ({z.shape[-1]}, M), got {tuple(directions.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = z.to(dtype) @ directions.to(dtype)
            cf = _characteristic(x, self.t_max, self.knots, self.kernel)
            if _distributed():
                cf = _AllReduceMean.apply(cf)
            return _statistic(cf, n_global, self.t_max, self.knots).mean()
