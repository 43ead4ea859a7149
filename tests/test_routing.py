"""Bi-level routing attention: routing_topk, the fused call, the region layout, the errors, and the torch
backend's non-CPU (chunked matmul) path. Backends against `reference` are in test_ops.py (registry-generated)."""
import pytest
import torch

from mixzoo.ops import bilevel_routing_attention, routed_attention, routing_topk
from mixzoo.ops.routing import eager, from_regions, region_size, to_regions


def _qkv(B=2, h=2, R=6, T=5, D=8, Tk=None, Dv=None, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    Tk, Dv = Tk or T, Dv or D
    return tuple(torch.randn(*s, generator=g, dtype=dtype).requires_grad_(grad)
                 for s in ((B, h, R, T, D), (B, h, R, Tk, D), (B, h, R, Tk, Dv)))


def _loop_oracle(q, k, v, idx, scale):
    """Per (image, head, query region): concatenate the routed regions' tokens, one softmax."""
    out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for r in range(q.shape[2]):
                keys = torch.cat([k[b, h, j] for j in idx[b, r].tolist()])
                vals = torch.cat([v[b, h, j] for j in idx[b, r].tolist()])
                out[b, h, r] = torch.softmax(q[b, h, r] @ keys.T * scale, -1) @ vals
    return out


# ---- routing_topk --------------------------------------------------------------------------------

def test_routing_topk_order_and_weights():
    g = torch.Generator().manual_seed(1)
    q_r, k_r = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    w, idx = routing_topk(q_r, k_r, 4)
    logits = q_r @ k_r.transpose(-1, -2) * 16 ** -0.5          # default scale: C ** -0.5
    assert idx.dtype == torch.int64 and idx.shape == (2, 9, 4)
    assert torch.equal(idx, logits.topk(4, -1).indices)
    picked = logits.gather(-1, idx)
    assert (picked[..., :-1] >= picked[..., 1:]).all()           # descending
    torch.testing.assert_close(w, torch.softmax(picked, -1))
    w2, idx2 = routing_topk(q_r, k_r, 4, scale=0.05)
    assert torch.equal(idx2, idx)                                 # a positive scale leaves the order
    torch.testing.assert_close(w2, torch.softmax(picked / 16 ** -0.5 * 0.05, -1))


def test_routing_topk_is_detached_and_topk_R_is_a_permutation():
    q_r = torch.randn(1, 7, 8, requires_grad=True)
    k_r = torch.randn(1, 7, 8, requires_grad=True)
    w, idx = routing_topk(q_r, k_r, 7)
    assert not w.requires_grad and w.grad_fn is None
    assert torch.equal(idx.sort(-1).values, torch.arange(7).expand(1, 7, 7))


# ---- routed / bi-level attention -------------------------------------------------------------------

def test_reference_matches_loop_oracle():
    q, k, v = _qkv(Tk=3, Dv=4)
    idx = torch.tensor([[[0, 5], [2, 2], [1, 3], [4, 0], [5, 1], [3, 4]]] * 2)    # a repeated index counts twice
    torch.testing.assert_close(routed_attention(q, k, v, idx, 0.3, backend='reference'),
                               _loop_oracle(q, k, v, idx, 0.3))


def test_full_routing_is_global_attention():
    q, k, v = _qkv(R=4)
    out = bilevel_routing_attention(q, k, v, topk=4, scale=0.2)
    flat = lambda t: t.flatten(2, 3)  # noqa: E731
    full = torch.softmax(flat(q) @ flat(k).transpose(-1, -2) * 0.2, -1) @ flat(v)
    torch.testing.assert_close(flat(out), full)


@pytest.mark.parametrize('backend', ['reference', 'torch'])
def test_bilevel_is_routing_then_attention(backend):
    q, k, v = _qkv(h=3, R=9, T=4, D=4, grad=True)
    scale = 12 ** -0.5
    out = bilevel_routing_attention(q, k, v, topk=3, scale=scale, backend=backend)
    # region means over tokens, heads' channels concatenated in head order
    q_r = torch.cat([q[:, i].mean(2) for i in range(3)], -1).detach()
    k_r = torch.cat([k[:, i].mean(2) for i in range(3)], -1).detach()
    _, idx = routing_topk(q_r, k_r, 3, scale)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = routed_attention(q2, k2, v2, idx, scale, backend=backend)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()       # the routing is detached: the same gradients as with a fixed idx
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_torch_backend_matmul_path(monkeypatch, dtype):
    """The path the torch backend takes off CPU (and for Dv != D): matmuls + softmax, several blocks per image."""
    monkeypatch.setattr(eager, '_flash_ok', lambda *a: False)
    monkeypatch.setattr(eager, '_LOGITS_BUDGET', 2 * 5 * 15 * 2)    # two query regions per block
    q, k, v = _qkv(R=5, dtype=dtype, grad=True)
    idx = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(2)).argsort(-1)[..., :3]
    idx[0, 1] = torch.tensor([4, 4, 0])                                   # duplicates
    out = routed_attention(q, k, v, idx, 0.3, backend='torch')
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = routed_attention(qd, kd, vd, idx, 0.3, backend='reference')
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=1e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    for a, b in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(a.grad.double(), b.grad, **tol)


# ---- regions -----------------------------------------------------------------------------------------

def test_regions_round_trip_and_layout():
    x = torch.randn(2, 10, 13, 3)
    r = to_regions(x, (2, 3))                      # padded to 10 x 15: regions of 5 x 5 tokens
    assert region_size((10, 13), (2, 3)) == (5, 5) and r.shape == (2, 6, 25, 3)
    torch.testing.assert_close(r[:, 4].reshape(2, 5, 5, 3), x[:, 5:10, 5:10])   # region (1, 1), row-major
    assert (r[:, 5].reshape(2, 5, 5, 3)[:, :, 3:] == 0).all()                   # bottom-right padding is zero
    assert torch.equal(from_regions(r, (2, 3), (10, 13)), x)
    assert region_size((256, 256), 7) == (37, 37)                               # BiFormer-T stage 1 at 1024


# ---- errors --------------------------------------------------------------------------------------------

def test_clear_errors():
    q, k, v = _qkv()
    idx = torch.zeros(2, 6, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match='must be \\(B, heads, R, T, D\\)'):
        routed_attention(q[0], k, v, idx)
    with pytest.raises(ValueError, match='must share'):
        routed_attention(q, k[:, :1], v, idx)
    with pytest.raises(ValueError, match='head dim'):
        routed_attention(q, k[..., :4], v, idx)
    with pytest.raises(ValueError, match='tokens per region'):
        routed_attention(q, k, v[:, :, :, :2], idx)
    with pytest.raises(ValueError, match='dtype'):
        routed_attention(q, k.float(), v, idx)
    with pytest.raises(ValueError, match='int64'):
        routed_attention(q, k, v, idx.int())
    with pytest.raises(ValueError, match='idx must be \\(B, R, topk\\)'):
        routed_attention(q, k, v, idx[:, :3])
    with pytest.raises(ValueError, match='idx must be \\(B, R, topk\\)'):
        routed_attention(q, k, v, torch.zeros(2, 6, 7, dtype=torch.int64))       # topk > R
    with pytest.raises(ValueError, match='values must lie in \\[0, R=6\\)'):
        routed_attention(q, k, v, idx + 6)
    with pytest.raises(ValueError, match='values must lie'):
        routed_attention(q, k, v, idx - 1)
    with pytest.raises(ValueError, match='topk must be an int in \\[1, R=6\\]'):
        routing_topk(q[:, 0, :, 0], k[:, 0, :, 0], 7)
    with pytest.raises(ValueError, match='topk'):
        routing_topk(q[:, 0, :, 0], k[:, 0, :, 0], 0)
    with pytest.raises(ValueError, match='\\(B, R, C\\)'):
        routing_topk(q[:, 0], k[:, 0], 2)
    with pytest.raises(ValueError, match='expected \\(B, 9, 16, C\\)'):
        from_regions(torch.zeros(1, 9, 15, 2), 3, (12, 12))
    with pytest.raises(ValueError, match='region grid'):
        to_regions(torch.zeros(1, 4, 4, 2), 0)


def test_torch_backend_flash_path_in_several_blocks(monkeypatch):
    monkeypatch.setattr(eager, '_GATHER_BUDGET', 2 * 3 * 5 * 16 * 2)   # two query regions per block
    q, k, v = _qkv(R=7, dtype=torch.float32, grad=True)
    idx = torch.rand(2, 7, 7, generator=torch.Generator().manual_seed(4)).argsort(-1)[..., :3]
    assert len(eager._blocks(q, k, v, idx, True)) == 8
    out = routed_attention(q, k, v, idx, 0.3, backend='torch')
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = routed_attention(qd, kd, vd, idx, 0.3, backend='reference')
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    out.sum().backward()
    ref.sum().backward()
    for a, b in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=1e-4)


def test_triton_custom_ops_opcheck():
    """The Triton kernels as torch custom ops: fake (meta) shapes, autograd registration and schema agree
    with the real kernels (under the interpreter on CPU)."""
    pytest.importorskip('triton', reason='missing dependency: triton')
    from mixzoo.ops._dispatch import triton_unavailable
    if triton_unavailable():
        pytest.skip('backend cannot run here: ' + triton_unavailable())
    from mixzoo.ops.routing import triton as rt
    q, k, v = _qkv(B=1, h=2, R=3, T=4, D=8, Tk=5, Dv=16, dtype=torch.float32, grad=True)
    idx = torch.tensor([[[2, 0], [1, 1], [0, 2]]])
    torch.library.opcheck(rt._fwd_op, (q, k, v, idx, 0.3))
    out = rt.routed_attention(q, k, v, idx, 0.3)
    assert out.shape == (1, 2, 3, 4, 16) and out.permute(0, 2, 3, 1, 4).is_contiguous()   # heads-last storage
