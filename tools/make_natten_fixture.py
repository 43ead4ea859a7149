#!/usr/bin/env python
"""Make tests/fixtures/natten_na2d.safetensors: NATTEN's own 2-D neighborhood attention (the unfused
``natten.functional.na2d_qk`` + softmax + ``na2d_av`` that NAT's / DiNAT's module runs) on small cases, the
reference the zoo's ``ops.neighborhood_attention(..., border='shift')`` backends are checked against.

Per case (float64): q, k, v, rpb, a fixed upstream gradient g, the output and the gradients of sum(out * g)
with respect to q, k, v and rpb; and, read off NATTEN itself, which key and which rpb entry every window slot
uses (na2d_qk on keys that hold their own position, and on an rpb that holds its own index).

    python tools/make_natten_fixture.py      # in an environment with natten 0.17.5 (CPU build) and safetensors

NATTEN 0.17.5 is the last release with CPU kernels and the relative-position bias; see tools/official/nat.py
for building it against torch 2.14. The zoo itself is not imported.
"""
import datetime
import json
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / 'tests' / 'fixtures' / 'natten_na2d.safetensors'
# (kernel, dilation, H, W, batch, heads, head dim): kernels 3-13, dilations 1-4, maps of exactly kernel x
# dilation, sides that the dilation does not divide, non-square maps
CASES = [(3, 1, 7, 9, 2, 2, 4), (3, 2, 8, 7, 1, 2, 4), (3, 3, 9, 12, 1, 2, 4), (5, 1, 5, 8, 1, 2, 4),
         (5, 2, 11, 10, 1, 2, 4), (5, 3, 16, 15, 1, 2, 4), (7, 1, 7, 7, 1, 2, 4), (7, 1, 9, 11, 1, 2, 4),
         (7, 2, 14, 15, 1, 2, 4), (7, 4, 28, 30, 1, 1, 4), (9, 1, 12, 9, 1, 1, 4), (11, 1, 11, 14, 1, 1, 4),
         (13, 1, 13, 14, 1, 1, 4)]


def name(case) -> str:
    kernel, dilation, H, W = case[:4]
    return f'k{kernel}_d{dilation}_{H}x{W}'


def attention(q, k, v, rpb, kernel, dilation):
    from natten.functional import na2d_av, na2d_qk
    return na2d_av(na2d_qk(q, k, kernel, dilation, rpb=rpb).softmax(-1), v, kernel, dilation)


def slot_tables(H, W, kernel, dilation):
    """(key position (H, W, k*k), rpb index (H, W, k*k)) of every window slot, read off NATTEN: with q = 1 and
    each key equal to its own flat position, a slot's logit is its key's position; with q = k = 0 and rpb =
    arange, its rpb entry's flat index."""
    from natten.functional import na2d_qk
    one = torch.ones(1, 1, H, W, 1, dtype=torch.float64)
    where = torch.arange(H * W, dtype=torch.float64).view(1, 1, H, W, 1)
    pos = na2d_qk(one, where, kernel, dilation)[0, 0].round().short()
    n = 2 * kernel - 1
    zero = torch.zeros_like(one)
    rel = na2d_qk(zero, zero, kernel, dilation, rpb=torch.arange(n * n, dtype=torch.float64).view(1, n, n))
    return pos, rel[0, 0].round().short()     # (int16: small files)


def main():
    import natten
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    tensors, cases = {}, []
    for case in CASES:
        kernel, dilation, H, W, B, h, D = case
        q, k, v, grad = (torch.randn(B, h, H, W, D, generator=g, dtype=torch.float64) for _ in range(4))
        rpb = 0.5 * torch.randn(h, 2 * kernel - 1, 2 * kernel - 1, generator=g, dtype=torch.float64)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, rpb)]
        out = attention(*leaves, kernel, dilation)
        (out * grad).sum().backward()
        pos, rel = slot_tables(H, W, kernel, dilation)
        n = name(case)
        tensors.update({f'{n}/q': q, f'{n}/k': k, f'{n}/v': v, f'{n}/rpb': rpb, f'{n}/grad_out': grad,
                        f'{n}/out': out.detach(), f'{n}/slot_key': pos, f'{n}/slot_rpb': rel})
        tensors.update({f'{n}/grad_{a}': t.grad for a, t in zip(('q', 'k', 'v', 'rpb'), leaves)})
        cases.append(dict(name=n, kernel=kernel, dilation=dilation, H=H, W=W, batch=B, heads=h, head_dim=D))
    meta = dict(natten=natten.__version__, torch=torch.__version__, made=datetime.date.today().isoformat(),
                computation='out = na2d_av(softmax(na2d_qk(q, k, kernel, dilation, rpb=rpb)), v, kernel, dilation) '
                            '(q as given: no scaling); grads of sum(out * grad_out)',
                cases=cases)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT), metadata={'mixzoo': json.dumps(meta)})
    print(f'wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB, {len(cases)} cases)')


if __name__ == '__main__':
    sys.exit(main())
