"""SIGReg's empirical characteristic function as two fused Triton kernels (CUDA).

For x (B, N, M) and knots t_k = k·dt, k = 1..P, the forward returns (1/N) Σ_j e^{i t_k x_jm} as
(B, P, M, 2) (cos, sin), like :class:`lejepa.sigreg._GridCharacteristic`. One program takes a
block of columns of one row b, reads each x_jm once and evaluates cos and sin of every knot in
registers, accumulating over N: no (N, M, P) or (N, M) temporary is written, so the work is one
pass over x, bound by the special-function units rather than memory.

Backward: ∂c_k/∂x_j = −(t_k/N) sin(t_k x_j) and ∂s_k/∂x_j = (t_k/N) cos(t_k x_j), so
∂L/∂x_jm = (1/N) Σ_k t_k (g^s_km cos(t_k x_jm) − g^c_km sin(t_k x_jm)), one program per block of
(N, M), again without temporaries. Everything runs in float32.

Off CUDA the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``), which the
tests use to check them against the direct formula on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _forward_kernel(x_ptr, out_ptr, N, M, dt, inv_n, P: tl.constexpr, PP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cmask = cols < M
    k = tl.arange(0, PP)
    t = (k + 1).to(tl.float32) * dt
    acc_c = tl.zeros([PP, BLOCK_M], dtype=tl.float32)
    acc_s = tl.zeros([PP, BLOCK_M], dtype=tl.float32)
    base = x_ptr + b * N * M
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        x = tl.load(base + rows[:, None] * M + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        angle = x[:, None, :] * t[None, :, None]  # (BLOCK_N, PP, BLOCK_M)
        valid = rmask[:, None, None]
        acc_c += tl.sum(tl.where(valid, tl.cos(angle), 0.0), axis=0)
        acc_s += tl.sum(tl.where(valid, tl.sin(angle), 0.0), axis=0)
    offs = ((b * P + k[:, None]) * M + cols[None, :]) * 2
    mask = (k[:, None] < P) & cmask[None, :]
    tl.store(out_ptr + offs, acc_c * inv_n, mask=mask)
    tl.store(out_ptr + offs + 1, acc_s * inv_n, mask=mask)


@triton.jit
def _backward_kernel(x_ptr, g_ptr, gx_ptr, N, M, dt, inv_n, P: tl.constexpr, PP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask, cmask = rows < N, cols < M
    k = tl.arange(0, PP)
    t = (k + 1).to(tl.float32) * dt
    goffs = ((b * P + k[:, None]) * M + cols[None, :]) * 2
    gmask = (k[:, None] < P) & cmask[None, :]
    gc = tl.load(g_ptr + goffs, mask=gmask, other=0.0) * t[:, None]  # (PP, BLOCK_M), padded knots 0
    gs = tl.load(g_ptr + goffs + 1, mask=gmask, other=0.0) * t[:, None]
    xmask = rmask[:, None] & cmask[None, :]
    offs = b * N * M + rows[:, None] * M + cols[None, :]
    x = tl.load(x_ptr + offs, mask=xmask, other=0.0)
    angle = x[:, None, :] * t[None, :, None]
    grad = tl.sum(gs[None, :, :] * tl.cos(angle) - gc[None, :, :] * tl.sin(angle), axis=1)
    tl.store(gx_ptr + offs, grad * inv_n, mask=xmask)


_BLOCK_N, _BLOCK_M = 16, 32


class TritonCharacteristic(torch.autograd.Function):
    """x (B, N, M) float32 → (B, powers, M, 2): the mean over N of (cos, sin)(k·dt·x), k = 1..powers."""

    @staticmethod
    def forward(ctx, x: Tensor, dt: float, powers: int) -> Tensor:
        x = x.contiguous()
        rows, n, cols = x.shape
        out = torch.empty(rows, powers, cols, 2, dtype=torch.float32, device=x.device)
        padded = triton.next_power_of_2(powers)
        grid = (rows, triton.cdiv(cols, _BLOCK_M))
        _forward_kernel[grid](x, out, n, cols, dt, 1.0 / n, P=powers, PP=padded, BLOCK_N=_BLOCK_N, BLOCK_M=_BLOCK_M)
        ctx.save_for_backward(x)
        ctx.dt = dt
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        rows, n, cols = x.shape
        powers = grad.shape[1]
        grad_x = torch.empty_like(x)
        grid = (rows, triton.cdiv(n, _BLOCK_N), triton.cdiv(cols, _BLOCK_M))
        _backward_kernel[grid](x, grad.float().contiguous(), grad_x, n, cols, ctx.dt, 1.0 / n, P=powers,
                               PP=triton.next_power_of_2(powers), BLOCK_N=_BLOCK_N, BLOCK_M=_BLOCK_M)
        return grad_x, None, None
