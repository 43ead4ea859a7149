"""Neighborhood attention semantics that do not rest on the reference: the border policies' windows
(TransNeXt's centred mask, NATTEN's inward shift, dilation sub-grids), the full-map limit, and the
tiled fast path across tile boundaries."""
import pytest
import torch
import torch.nn.functional as F

from mixzoo.ops import neighborhood_attention
from mixzoo.ops.neighborhood import geometry as G


def test_axis_windows():
    pos, valid, _ = G.axis_windows(7, 3, 1, 'shift')
    assert pos[0].tolist() == [0, 1, 2] and pos[3].tolist() == [2, 3, 4] and pos[6].tolist() == [4, 5, 6]
    assert bool(valid.all())
    pos, valid, rel = G.axis_windows(7, 3, 1, 'mask')
    assert valid[0].tolist() == [False, True, True] and pos[3].tolist() == [2, 3, 4]
    assert rel[3].tolist() == [-1, 0, 1]
    pos, valid, _ = G.axis_windows(7, 3, 2, 'shift')     # dilation 2: sub-grids {0,2,4,6} and {1,3,5}
    assert pos[0].tolist() == [0, 2, 4] and pos[6].tolist() == [2, 4, 6] and pos[1].tolist() == [1, 3, 5]
    pos, valid, _ = G.axis_windows(2, 5, 1, 'shift')     # map smaller than the window: all of it
    assert pos[0, :2].tolist() == [0, 1] and valid[0].tolist() == [True, True, False, False, False]


@pytest.mark.parametrize('backend', ['reference', 'torch'])
@pytest.mark.parametrize('border,kernel', [('mask', 11), ('shift', 5)])
def test_window_covering_the_map_is_full_attention(backend, border, kernel):
    B, h, H, W, D = 2, 2, 5, 5, 8
    q, k, v = (torch.randn(B, h, H, W, D, dtype=torch.float64) for _ in range(3))
    ek, ev = (torch.randn(B, h, 3, D, dtype=torch.float64) for _ in range(2))
    out = neighborhood_attention(q, k, v, kernel, extra_k=ek, extra_v=ev, border=border, backend=backend)
    kk = torch.cat([k.flatten(2, 3), ek], 2)
    vv = torch.cat([v.flatten(2, 3), ev], 2)
    want = F.scaled_dot_product_attention(q.flatten(2, 3), kk, vv).unflatten(2, (H, W))
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize('border,dilation,kernel', [('shift', 1, 3), ('shift', 3, 3), ('mask', 2, 3), ('mask', 1, 5)])
@pytest.mark.parametrize('extra,tiles', [(False, 'tokens'), (True, 'tokens'), (True, 'bytes')])
def test_torch_backend_across_tiles(monkeypatch, border, dilation, kernel, extra, tiles):
    """Both paths of the torch backend cut the map into many pieces and still equal the reference, forward and
    backward: query-row tiles of the path with extra keys (centred windows: products one slot at a time, gradients
    by strided multiply-adds; shifted windows: gathered, an index_add backward), query tiles, their key regions
    (clamped at the far edges; gradients by slice adds) and chunks of tile rows of the blocked path, dilation groups
    of two lengths (17 = 3 * 6 - 1)."""
    from mixzoo.ops.neighborhood import eager as nb_torch
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 17, 13, 8, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3))
    rpb = torch.randn(2, 2 * kernel - 1, 2 * kernel - 1, dtype=torch.float64, generator=g).requires_grad_()
    kw = dict(rpb=rpb, border=border)
    if extra:
        kw.update(extra_k=torch.randn(2, 2, 4, 8, dtype=torch.float64, generator=g),
                  extra_v=torch.randn(2, 2, 4, 8, dtype=torch.float64, generator=g))
    monkeypatch.setattr(nb_torch, 'TILE_TOKENS', 10)     # gathered path: 1 row of 13 per tile
    if tiles == 'bytes':                                 # or 2 rows a tile, by the gathered windows' bytes
        monkeypatch.setattr(nb_torch, 'TILE_TOKENS', 10 ** 6)
        monkeypatch.setattr(nb_torch, 'TILE_BYTES', 2 * (2 * 2 * 13 * kernel ** 2 * 8 * 8))
    monkeypatch.setattr(nb_torch, 'TILE_SIDE', 2)        # blocked path: 2 x 2 query tiles, one tile row per chunk
    monkeypatch.setattr(nb_torch, 'CHUNK_BYTES', 1)
    outs, grads = [], []
    for backend in ('reference', 'torch'):
        out = neighborhood_attention(q, k, v, kernel, dilation, backend=backend, **kw)
        grads.append(torch.autograd.grad(out, (q, k, v, rpb), torch.ones_like(out)))
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_bad_arguments_are_named():
    q = torch.randn(1, 2, 4, 4, 8)
    with pytest.raises(ValueError, match='odd'):
        neighborhood_attention(q, q, q, 4)
    with pytest.raises(ValueError, match='border'):
        neighborhood_attention(q, q, q, 3, border='wrap')
    with pytest.raises(ValueError, match='rpb'):
        neighborhood_attention(q, q, q, 3, rpb=torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match='extra_k'):
        neighborhood_attention(q, q, q, 3, extra_k=torch.zeros(1, 2, 3, 8))


@pytest.mark.parametrize('border,dilation', [('mask', 1), ('mask', 2), ('shift', 1), ('shift', 2)])
def test_aggregate_is_the_value_sum_of_the_windows(border, dilation):
    from mixzoo.ops import neighborhood_aggregate
    B, h, H, W, k = 1, 2, 7, 6, 3
    w = torch.randn(B, h, H, W, k * k, dtype=torch.float64)
    v = torch.randn(B, h, H, W, 5, dtype=torch.float64)
    idx, valid, _, _ = G.windows(H, W, k, dilation, border, 'cpu')
    want = torch.zeros(B, h, H, W, 5, dtype=torch.float64)
    vf = v.reshape(B, h, H * W, 5)
    for y in range(H):
        for x in range(W):
            for j in range(k * k):
                if valid[y, x, j]:
                    want[:, :, y, x] += w[:, :, y, x, j, None] * vf[:, :, idx[y, x, j]]
    torch.testing.assert_close(neighborhood_aggregate(w, v, k, dilation, border), want)


@pytest.mark.parametrize('backend', ['reference', 'torch'])
@pytest.mark.parametrize('grad', [False, True])
def test_grid_bias_equals_its_tensor(backend, grad, monkeypatch):
    """A GridBias gives the same outputs and table gradients as the bias tensor it stands for, also when
    the torch backend splits the queries into several tiles."""
    from mixzoo.ops.neighborhood import GridBias, eager
    monkeypatch.setattr(eager, 'TILE_TOKENS', 14)   # 5 x 7 map: 5 tiles of a row
    B, h, H, W, D, ph, pw = 2, 2, 5, 7, 8, 2, 3
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, H, W, D, generator=g, dtype=torch.float64) for _ in range(3))
    ek, ev = (torch.randn(B, h, ph * pw, D, generator=g, dtype=torch.float64) for _ in range(2))
    table = torch.randn(h, 4, 5, generator=g, dtype=torch.float64, requires_grad=grad)
    ih, iw = torch.randint(0, 4, (H, ph), generator=g), torch.randint(0, 5, (W, pw), generator=g)
    gb = GridBias(table, ih, iw)
    full = table[:, ih[:, None, :, None], iw[None, :, None, :]].reshape(1, h, H, W, ph * pw)
    assert torch.equal(gb.materialize(), full) and gb.shape == full.shape
    with torch.set_grad_enabled(grad):
        a = neighborhood_attention(q, k, v, 3, extra_k=ek, extra_v=ev, extra_bias=gb, backend=backend)
        b = neighborhood_attention(q, k, v, 3, extra_k=ek, extra_v=ev, extra_bias=full, backend=backend)
    assert torch.allclose(a, b, atol=1e-12)
    if grad:
        ga, = torch.autograd.grad(a.square().sum(), table)
        gb_, = torch.autograd.grad(b.square().sum(), table)
        assert torch.allclose(ga, gb_, atol=1e-10)
    with pytest.raises(ValueError, match='GridBias table must have 1 or 2 heads'):
        neighborhood_attention(q, k, v, 3, extra_k=ek, extra_v=ev, extra_bias=GridBias(table.detach().repeat(2, 1, 1), ih, iw))
