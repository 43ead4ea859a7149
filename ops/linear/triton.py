"""Linear attention in Triton: forward and backward, float32 accumulation, no (N x N) matrix.

Forward, two kernels:
  _state  S = K^T V (D, Dv) and z = sum_n k_n (D), in one pass over the keys and values; the tokens
          are split into chunks whose partial sums are added with fp32 atomics (parallelism over N
          for large maps, where batch * heads alone would leave most of a GPU idle);
  _output o_n = t * (q_n S) / max(q_n . z, clamp_min), value columns in blocks of BLOCK_E.
Backward, two kernels (delta_n = dO_n . o_n is computed beforehand, as flash attention does):
  _bwd_state  A = Q^T G with g_n = dO_n / den_n, and dz = sum_n ds_n q_n with
              ds_n = -delta_n / den_n where the clamp is inactive (0 where it clamps);
  _bwd_tokens dq_n = t (g_n S^T) + ds_n z,  dk_n = t (v_n A^T) + dz,  dv_n = t (k_n A);
  and dt_h = sum_b <S, A> on the (D, Dv) states.

Layout: q, k (B, heads, N, D), v (B, heads, N, Dv), any strides (views of a fused qkv projection);
the output is allocated (B, N, heads, Dv) and returned as a (B, heads, N, Dv) view, so the caller's
``transpose(1, 2).reshape(B, N, heads * Dv)`` is free. The temperature is a (heads,) float32 vector.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from .._dispatch import empty, triton_interpret
from .._triton import pick, tile


def _block_n() -> int:
    return 16 if triton_interpret() else 64


def _chunk(N: int) -> int:
    """Tokens per program of the reduction kernels (a multiple of the token block)."""
    bn = _block_n()
    target = 2 * bn if triton_interpret() else 512    # small under the interpreter: the tests cover the atomics
    return max(bn, triton.cdiv(min(target, N), bn) * bn)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _block_e(Dv: int) -> int:
    return min(64, max(16, triton.next_power_of_2(Dv)))


@triton.jit
def _load(P, b, h, offs_r, offs_c, R, C, sb, sh, sr, sc):
    """A (rows, cols) fp32 tile of a (B, heads, R, C) strided tensor, zero outside."""
    ptrs = P + b * sb + h * sh + offs_r[:, None] * sr + offs_c[None, :] * sc
    return tl.load(ptrs, mask=(offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.).to(tl.float32)


@triton.jit
def _store(P, val, b, h, offs_r, offs_c, R, C, sb, sh, sr, sc):
    ptrs = P + b * sb + h * sh + offs_r[:, None] * sr + offs_c[None, :] * sc
    tl.store(ptrs, val.to(P.dtype.element_ty), mask=(offs_r[:, None] < R) & (offs_c[None, :] < C))


@triton.jit
def _dot(a, b):
    return tl.dot(a, b, input_precision='ieee')


@triton.jit
def _state(K, V, S, Z, skb, skh, skn, skd, svb, svh, svn, svd, H, N, D, DV, CHUNK,
           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program (value block, batch*head, token chunk): adds its chunk's K^T V block (and, for the first
    value block, its key sum) into S (B*heads, D, Dv) / Z (B*heads, D), fp32, zero-initialised."""
    pid_e, bh, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = tl.zeros([BLOCK_D, BLOCK_E], tl.float32)
    z = tl.zeros([BLOCK_D], tl.float32)
    for start in range(pid_c * CHUNK, tl.minimum(pid_c * CHUNK + CHUNK, N), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load(K, b, h, offs_n, offs_d, N, D, skb, skh, skn, skd)
        v = _load(V, b, h, offs_n, offs_e, N, DV, svb, svh, svn, svd)
        acc += _dot(tl.trans(k), v)
        z += tl.sum(k, 0)
    tl.atomic_add(S + bh * D * DV + offs_d[:, None] * DV + offs_e[None, :], acc,
                  mask=(offs_d[:, None] < D) & (offs_e[None, :] < DV))
    if pid_e == 0:
        tl.atomic_add(Z + bh * D + offs_d, z, mask=offs_d < D)


@triton.jit
def _output(Q, S, Z, T, O, sqb, sqh, sqn, sqd, sob, soh, son, sod, H, N, D, DV, clamp_min,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load(Q, b, h, offs_n, offs_d, N, D, sqb, sqh, sqn, sqd)
    z = tl.load(Z + bh * D + offs_d, mask=offs_d < D, other=0.)
    den = tl.maximum(tl.sum(q * z[None, :], 1), clamp_min)
    scale = tl.load(T + h) / den
    for e0 in range(0, DV, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        s = tl.load(S + bh * D * DV + offs_d[:, None] * DV + offs_e[None, :],
                    mask=(offs_d[:, None] < D) & (offs_e[None, :] < DV), other=0.)
        _store(O, _dot(q, s) * scale[:, None], b, h, offs_n, offs_e, N, DV, sob, soh, son, sod)


@triton.jit
def _bwd_state(Q, DO, Delta, Z, A, DZ, sqb, sqh, sqn, sqd, sdb, sdh, sdn, sdd, H, N, D, DV, CHUNK, clamp_min,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program (value block, batch*head, token chunk): adds its chunk's Q^T G block into A and, for the
    first value block, sum_n ds_n q_n into DZ (fp32, zero-initialised)."""
    pid_e, bh, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    z = tl.load(Z + bh * D + offs_d, mask=offs_d < D, other=0.)
    acc = tl.zeros([BLOCK_D, BLOCK_E], tl.float32)
    dz = tl.zeros([BLOCK_D], tl.float32)
    for start in range(pid_c * CHUNK, tl.minimum(pid_c * CHUNK + CHUNK, N), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        q = _load(Q, b, h, offs_n, offs_d, N, D, sqb, sqh, sqn, sqd)
        do = _load(DO, b, h, offs_n, offs_e, N, DV, sdb, sdh, sdn, sdd)
        qz = tl.sum(q * z[None, :], 1)
        den = tl.maximum(qz, clamp_min)
        acc += _dot(tl.trans(q), do / den[:, None])
        delta = tl.load(Delta + bh * N + offs_n, mask=offs_n < N, other=0.)
        ds = tl.where(qz >= clamp_min, -delta / den, 0.)
        dz += tl.sum(ds[:, None] * q, 0)
    tl.atomic_add(A + bh * D * DV + offs_d[:, None] * DV + offs_e[None, :], acc,
                  mask=(offs_d[:, None] < D) & (offs_e[None, :] < DV))
    if pid_e == 0:
        tl.atomic_add(DZ + bh * D + offs_d, dz, mask=offs_d < D)


@triton.jit
def _bwd_tokens(Q, K, V, DO, Delta, T, S, Z, A, DZ, DQ, DK, DV_,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                H, N, D, DV, clamp_min,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program (token block, batch*head): dq, dk, dv of its tokens (outputs contiguous (B, heads, N, *))."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    t = tl.load(T + h)
    q = _load(Q, b, h, offs_n, offs_d, N, D, sqb, sqh, sqn, sqd)
    k = _load(K, b, h, offs_n, offs_d, N, D, skb, skh, skn, skd)
    z = tl.load(Z + bh * D + offs_d, mask=offs_d < D, other=0.)
    dz = tl.load(DZ + bh * D + offs_d, mask=offs_d < D, other=0.)
    qz = tl.sum(q * z[None, :], 1)
    den = tl.maximum(qz, clamp_min)
    delta = tl.load(Delta + bh * N + offs_n, mask=offs_n < N, other=0.)
    ds = tl.where(qz >= clamp_min, -delta / den, 0.)
    dq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for e0 in range(0, DV, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        smask = (offs_d[:, None] < D) & (offs_e[None, :] < DV)
        s = tl.load(S + bh * D * DV + offs_d[:, None] * DV + offs_e[None, :], mask=smask, other=0.)
        a = tl.load(A + bh * D * DV + offs_d[:, None] * DV + offs_e[None, :], mask=smask, other=0.)
        do = _load(DO, b, h, offs_n, offs_e, N, DV, sdb, sdh, sdn, sdd)
        v = _load(V, b, h, offs_n, offs_e, N, DV, svb, svh, svn, svd)
        dq += _dot(do, tl.trans(s))
        dk += _dot(v, tl.trans(a))
        _store(DV_, _dot(k, a) * t, b, h, offs_n, offs_e, N, DV, H * N * DV, N * DV, DV, 1)
    dq = dq * (t / den)[:, None] + ds[:, None] * z[None, :]
    dk = dk * t + dz[None, :]
    _store(DQ, dq, b, h, offs_n, offs_d, N, D, H * N * D, N * D, D, 1)
    _store(DK, dk, b, h, offs_n, offs_d, N, D, H * N * D, N * D, D, 1)


def _warps() -> int:
    return 1 if triton_interpret() else 4


# the backward kernels' launch tiles (ops._triton): 8 warps (in 4 both spilled 0.6-0.8 KB of registers at
# L2ViT's shapes: ptxas, bf16, sm_90); _bwd_tokens in 2 stages above head dim 32 (sm_80 at 128)
_BWD_STATE = (tile(BLOCK_N=64, num_warps=8),)
_BWD_TOKENS = (tile(BLOCK_N=64, num_warps=8, max_d=(32, 32)), tile(BLOCK_N=64, num_warps=8, num_stages=2))


def _reduction_grid(B, H, N, Dv):
    chunk = _chunk(N)
    return chunk, (triton.cdiv(Dv, _block_e(Dv)), B * H, triton.cdiv(N, chunk))


# The kernels are wrapped as torch custom ops (forward and backward), so torch.compile / export
# trace through them as single nodes.

@torch.library.custom_op('mixzoo::linear_attention_fwd', mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
            clamp_min: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> out (B, N, heads, Dv) contiguous, S (B, heads, D, Dv) fp32, z (B, heads, D) fp32."""
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    S = torch.zeros((B, H, D, Dv), dtype=torch.float32, device=q.device)
    Z = torch.zeros((B, H, D), dtype=torch.float32, device=q.device)
    out = empty((B, N, H, Dv), dtype=q.dtype, device=q.device)
    out_v = out.transpose(1, 2)
    blocks = dict(BLOCK_N=_block_n(), BLOCK_D=_block_d(D), BLOCK_E=_block_e(Dv), num_warps=_warps())
    chunk, grid = _reduction_grid(B, H, N, Dv)
    _state[grid](k, v, S, Z, *k.stride(), *v.stride(), H, N, D, Dv, chunk, **blocks)
    _output[(triton.cdiv(N, _block_n()), B * H)](q, S, Z, t, out_v, *q.stride(), *out_v.stride(),
                                                  H, N, D, Dv, clamp_min, **blocks)
    return out, S, Z


@_fwd_op.register_fake
def _(q, k, v, t, clamp_min):
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    return (q.new_empty((B, N, H, Dv)), q.new_empty((B, H, D, Dv), dtype=torch.float32),
            q.new_empty((B, H, D), dtype=torch.float32))


@torch.library.custom_op('mixzoo::linear_attention_bwd', mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: torch.Tensor, S: torch.Tensor,
            Z: torch.Tensor, out: torch.Tensor, do: torch.Tensor,
            clamp_min: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """do: (B, heads, N, Dv), any strides; -> dq, dk (B, heads, N, D), dv (B, heads, N, Dv), dt (heads,) fp32."""
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    delta = (do.float() * out.transpose(1, 2).float()).sum(-1).contiguous()      # (B, heads, N)
    A = torch.zeros((B, H, D, Dv), dtype=torch.float32, device=q.device)
    dZ = torch.zeros((B, H, D), dtype=torch.float32, device=q.device)
    blocks = dict(BLOCK_N=_block_n(), BLOCK_D=_block_d(D), BLOCK_E=_block_e(Dv), num_warps=_warps())
    chunk, grid = _reduction_grid(B, H, N, Dv)
    _bwd_state[grid](q, do, delta, Z, A, dZ, *q.stride(), *do.stride(), H, N, D, Dv, chunk, clamp_min,
                     **dict(blocks, **pick(_BWD_STATE, blocks['BLOCK_D'], q.dtype)))
    dq, dk = (empty((B, H, N, D), dtype=q.dtype, device=q.device) for _ in range(2))
    dv = empty((B, H, N, Dv), dtype=v.dtype, device=q.device)
    _bwd_tokens[(triton.cdiv(N, _block_n()), B * H)](
        q, k, v, do, delta, t, S, Z, A, dZ, dq, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        H, N, D, Dv, clamp_min, **dict(blocks, **pick(_BWD_TOKENS, blocks['BLOCK_D'], q.dtype)))
    dt = (S * A).sum((0, 2, 3))
    return dq, dk, dv, dt


@_bwd_op.register_fake
def _(q, k, v, t, S, Z, out, do, clamp_min):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), t.new_empty(t.shape)


def _setup(ctx, inputs, output):
    q, k, v, t, clamp_min = inputs
    out, S, Z = output
    ctx.save_for_backward(q, k, v, t, S, Z, out)
    ctx.clamp_min = clamp_min


def _backward(ctx, do, _dS, _dZ):
    q, k, v, t, S, Z, out = ctx.saved_tensors
    dq, dk, dv, dt = _bwd_op(q, k, v, t, S, Z, out, do.transpose(1, 2), ctx.clamp_min)
    return dq, dk, dv, (dt if ctx.needs_input_grad[3] else None), None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def linear_attention(q, k, v, temperature=None, clamp_min: float = 100.) -> torch.Tensor:
    H = q.shape[1]
    t = (torch.ones(H, dtype=torch.float32, device=q.device) if temperature is None
         else temperature.reshape(H).float())
    out, _, _ = _fwd_op(q, k, v, t.contiguous(), float(clamp_min))
    return out.transpose(1, 2)
