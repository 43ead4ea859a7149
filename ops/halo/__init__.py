"""Halo (blocked local) attention, Vaswani et al. 2021 / timm's HaloAttn.

    out = halo_attention(q, k, v, block, halo, rel_h=None, rel_w=None, scale=None,
                         border='zero_pad', backend=None)

q       (B, heads, Dqk, Hq, Wq): queries, per-head channels first (a view of an NCHW projection).
        Hq = ceil(H / s) for a query stride s in {1, 2}; query blocks are block // s wide.
k, v    (B, heads, Dqk | Dv, H, W): keys / values on the full-resolution map.
block   query block size at full resolution; halo: extra rows/cols of keys on each side, so each
        block attends to a (block + 2 * halo)^2 window.
rel_h, rel_w  optional (2 * win - 1, Dqk) relative-position embeddings: logit += q . rel_h[kr - qr +
        win - 1] + q . rel_w[kc - qc + win - 1] with (qr, qc) the query's offset in its block and
        (kr, kc) the key's offset in the window (timm's PosEmbedRel; added after scaling q . k).
border  'zero_pad': keys outside the map are zero vectors and take part in the softmax (timm's
        HaloNet, kept for faithfulness); 'mask': they are excluded.
Any H, W: maps are padded to a block multiple internally and the output cropped.
Returns (B, heads, Dv, Hq, Wq).
"""
from typing import Optional

import torch

from .. import _cpu
from .._dispatch import Call, register_op, select, triton_kernels
from . import cpu, eager, reference
from .geometry import BORDERS

__all__ = ['halo_attention']

OP = 'halo'


def _measure() -> dict:
    """The C kernel and the torch backend on halonet26t's stage-3 call at batch 2 (NHWC projections)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 16, 8, 32, generator=g).permute(0, 3, 4, 1, 2) for _ in range(3))
    rel = [torch.randn(23, 32, generator=g) for _ in range(2)]
    fns = {'torch': lambda: eager.halo_attention(q, k, v, 8, 2, *rel)}
    if cpu.unavailable() is None:
        fns['c'] = lambda: cpu.halo_attention(q, k, v, 8, 2, *rel)
    return _cpu.interleaved(fns)


_cpu.register(OP, ('c', 'torch'), _measure, 'fp32 CPU inference halo attention: the C kernel (backend cpu) or '
              'the torch backend')


register_op(OP, triton=triton_kernels(__name__, 'halo_attention', validated=True, head_dims=(1, 128),
                                      limits={'window_area': 1024}, doc='fused forward + backward reading the '
                                      'halo window from the map (no unfolded K/V)'),
            cpu=dict(fn=cpu.halo_attention, devices=('cpu',), dtypes=(torch.float32,), autograd=False,
                     available=cpu.unavailable, auto_check=lambda call: _cpu.kernel_not_chosen(OP)),
            torch=eager.halo_attention, reference=reference.halo_attention)


def _validate(q, k, v, block, halo, rel_h, rel_w, border):
    if q.dim() != 5 or k.dim() != 5 or v.dim() != 5:
        raise ValueError(f'halo_attention: q, k, v must be (B, heads, D, H, W); got {tuple(q.shape)}, '
                         f'{tuple(k.shape)}, {tuple(v.shape)}')
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2] or k.shape[2] != q.shape[2]:
        raise ValueError(f'halo_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share '
                         '(B, heads) and q/k the head dim')
    if k.shape[-2:] != v.shape[-2:]:
        raise ValueError(f'halo_attention: k map {tuple(k.shape[-2:])} != v map {tuple(v.shape[-2:])}')
    H, W = k.shape[-2:]
    s = -(-H // q.shape[-2])
    if s not in (1, 2) or q.shape[-2:] != (-(-H // s), -(-W // s)) or block % s:
        raise ValueError(f'halo_attention: query map {tuple(q.shape[-2:])} must be the key map {(H, W)} '
                         f'at stride 1 or 2 (ceil), with block {block} divisible by the stride')
    if border not in BORDERS:
        raise ValueError(f'halo_attention: border must be one of {BORDERS}, got {border!r}')
    win = block + 2 * halo
    for name, t in (('rel_h', rel_h), ('rel_w', rel_w)):
        if (rel_h is None) != (rel_w is None):
            raise ValueError('halo_attention: give both rel_h and rel_w or neither')
        if t is not None and tuple(t.shape) != (2 * win - 1, q.shape[2]):
            raise ValueError(f'halo_attention: {name} must be (2 * win - 1, Dqk) = {(2 * win - 1, q.shape[2])}, '
                             f'got {tuple(t.shape)}')


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, halo: int,
                   rel_h: Optional[torch.Tensor] = None, rel_w: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None, border: str = 'zero_pad',
                   backend: Optional[str] = None) -> torch.Tensor:
    _validate(q, k, v, block, halo, rel_h, rel_w, border)
    call = Call.of(q, k, v, rel_h, head_dim=q.shape[2], window_area=(block + 2 * halo) ** 2)
    return select(OP, call, backend).fn(q, k, v, block, halo, rel_h, rel_w, scale, border)
