"""Neighborhood attention fast path in plain PyTorch.

Without extra keys or window weights (NAT / DiNAT): blocked dense products. The queries are cut into
small square tiles; each tile's windows all lie in one key region of (tile + kernel - 1)^2 keys, so a
tile's logits come from one matmul against its region, its window slots are picked from them, and after
the softmax its probabilities are scattered back onto the region for one more matmul with the region's
values. A quarter of the products are used (tile 8, kernel 7), but as large batched matmuls, where a
gather of every query's window runs at memory speed (7x7 windows copy K and V 49 times). Dilation splits
the map into its dilation groups (positions congruent modulo the dilation), each a dilation-free map.

With extra keys (TransNeXt): query rows in tiles, so the logits (window + extra keys) exist for one tile at a
time (memory bounded by the tile, not the map). Centred windows in full precision: the window logits and outputs
one slot at a time, each slot one shift of the map (strided products, no gathered copy of the windows; gradients
by strided multiply-adds); otherwise the tile's K/V windows gathered and batched matmuls. An extra bias given as
a ``GridBias`` is expanded one tile at a time too.

Inference on CPU with extra keys: the extra-key attention runs in SDPA's fused kernel, which also
returns its log-sum-exp, and is merged with the window part as two pieces of one softmax
(out = (e^lse_e * o_e + sum_w e^s_w v_w) / (e^lse_e + sum_w e^s_w), shifted by the max). That kernel
has no gradient for the log-sum-exp, so training takes the explicit path.
"""
import torch
from torch.autograd.function import once_differentiable

from .._dispatch import records_grad, symbolic, tracing
from . import geometry as G

TILE_TOKENS = 4096     # queries per tile (gathered path)
# and at most this much gathered K (or V) a tile, batch and heads included: the windows of a whole map at batch
# 8 were 16-65 MB for TransNeXt-T, above glibc's 32 MB mmap ceiling (fresh page faults on every call) or out of
# cache. Measured AMD EPYC, TransNeXt-T forward, batch 8 (two runs each): unbounded 1244 / 1257 ms, 8 MB 1147 /
# 1200 ms (bf16 autocast 795 -> 764 ms), 4 MB 1157 / 1145 ms but bf16 818 ms. The per-slot products (centred
# windows, full precision) gather nothing but keep these tiles: 32 or 128 MB tiles measured the same (fwd and
# fwd+bwd, batch 4 and 8, within 4%)
TILE_BYTES = 8 << 20
TILE_SIDE = 8          # query tile side (blocked path)
CHUNK_BYTES = 1 << 22  # logits buffer per chunk of tiles (blocked path)


def neighborhood_attention(q, k, v, kernel, dilation=1, rpb=None, extra_k=None, extra_v=None, extra_bias=None,
                           scale=None, border='mask', window_weights=None):
    """Blocked dense products without extra keys; else query-row tiles: gathered windows + extra keys, one
    softmax, batched matmuls."""
    B, h, H, W, D = q.shape
    sym = symbolic(H, W)
    # (exported with dilation or symbolic sizes: the gathered path, a few nodes a layer, the whole map one tile;
    # the blocked path's tiles and dilation groups are laid out in Python from the size (guards on it), and each
    # group's loop would be nodes: DiNAT's static ONNX export took 3x NAT's)
    if extra_k is None and window_weights is None and not ((dilation > 1 or sym) and torch.compiler.is_exporting()):
        return _dilated(q, k, v, kernel, dilation, rpb, q.shape[-1] ** -0.5 if scale is None else scale, border)
    Dv = v.shape[-1]
    K2 = kernel * kernel
    scale = D ** -0.5 if scale is None else scale
    idx, valid, rr, rc = G.windows(H, W, kernel, dilation, border, q.device)
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype   # softmax dtype
    add = torch.zeros(valid.shape, dtype=ct, device=q.device).masked_fill(~valid, float('-inf'))
    if rpb is not None:
        add = add + G.rel_bias(rpb, rr, rc).to(ct)                    # (h, H, W, k*k)
    kf, vf = k.reshape(B, h, H * W, D), v.reshape(B, h, H * W, Dv)
    ekt = extra_k.transpose(-1, -2) if extra_k is not None else None
    # (the fused merge calls a CPU kernel directly: not in an exported graph, which exporters re-trace with
    # gradients and which runs elsewhere; ONNX export failed on it)
    fused = (extra_k is not None and q.device.type == 'cpu' and _LSE_SDPA is not None and Dv == D   # (kernel's rule)
             and not torch.compiler.is_exporting()
             and not records_grad(q, k, v, rpb, extra_k, extra_v, extra_bias, window_weights))
    if window_weights is not None:          # out-of-map slots gather a clamped key: their weight must be 0
        window_weights = window_weights * valid.to(window_weights.dtype)
    if sym:     # (the whole map one tile: a tile count would be a guard on the size)
        spans = [(0, H)]
    else:
        rows = max(1, min(TILE_TOKENS // W, TILE_BYTES // (B * h * W * K2 * max(D, Dv) * q.element_size())))
        spans = [(r0, min(H, r0 + rows)) for r0 in range(0, H, rows)]
    outs = []
    for r0, r1 in spans:
        qt = q[:, :, r0:r1]                                                 # (B, h, t, W, D)
        it = idx[r0:r1]
        geo = (r0, r1, H, W, kernel, dilation, border)
        s = _window_dot(k, qt, kf, it, geo).to(ct) * scale                 # (B, h, t, W, k*k)
        s = s + add[..., r0:r1, :, :]
        if ekt is not None and fused:
            ww = None if window_weights is None else window_weights[:, :, r0:r1]
            outs.append(_merge_extra(qt, s, lambda w: _window_sum(w.to(v.dtype), v, vf, it, geo), extra_k, extra_v,
                                     extra_bias, r0, r1, scale, ww))
            continue
        if ekt is not None:
            se = (qt.flatten(2, 3) @ ekt).unflatten(2, (r1 - r0, W)).to(ct) * scale
            if extra_bias is not None:
                se = se + G.bias_rows(extra_bias, r0, r1).to(ct)
            s = torch.cat([s, se], dim=-1)
        p = torch.softmax(s, dim=-1).to(v.dtype)
        pw = p[..., :K2] if window_weights is None else p[..., :K2] + window_weights[:, :, r0:r1]
        o = _window_sum(pw, v, vf, it, geo)                                 # (B, h, t, W, Dv)
        if ekt is not None:
            o = o + (p[..., K2:].flatten(2, 3) @ extra_v).unflatten(2, (r1 - r0, W))
        outs.append(o)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _gather(x, it, geo):
    """``x[:, :, it]``: one query tile's windows (B, h, t, W, k*k, D) of the flat map ``x`` (B, h, H*W, D)."""
    if records_grad(x) and not tracing():
        return _WindowGather.apply(x, it, geo)
    return x[:, :, it]


def _per_slot(geo, x) -> bool:
    """Centred windows in float32 / float64, eager: a tile's window products are computed one slot at a time,
    each slot one shift of the map (below); otherwise from gathered windows (half types keep the batched
    matmuls' fp32 accumulation; traced graphs keep their few nodes)."""
    return geo[-1] == 'mask' and x.dtype in (torch.float32, torch.float64) and not tracing()


def _window_dot(k, q, kf, it, geo):
    """The window logits (B, h, t, W, k*k) of a query tile ``q`` (B, h, t, W, D) against the key map ``k``
    (B, h, H, W, D; ``kf`` flat)."""
    if not _per_slot(geo, q):
        return _SlotDot.apply(_gather(kf, it, geo), q)
    if records_grad(k, q):
        return _SlotProduct.apply(q, k, geo, True)
    return _slot_dots(geo, q, k)


def _window_sum(p, v, vf, it, geo):
    """The window outputs (B, h, t, W, Dv): the weights ``p`` (B, h, t, W, k*k) over the windows of the value map
    ``v`` (B, h, H, W, Dv; ``vf`` flat)."""
    if not _per_slot(geo, v):
        return _SlotSum.apply(p, _gather(vf, it, geo))
    if records_grad(p, v):
        return _SlotProduct.apply(p, v, geo, False)
    return _slot_sums(geo, p, v)


class _WindowGather(torch.autograd.Function):
    """``x[:, :, it]`` whose backward is an ``index_add_`` of the window gradients (autograd's own, an
    accumulating ``index_put_``, is single-threaded on CPU; measured AMD EPYC on a TransNeXt-T stage-1 tile: 2.67
    vs 1.57 ms). For shifted windows and half types; centred windows in full precision go one slot at a time."""

    @staticmethod
    def forward(ctx, x, it, geo):
        ctx.save_for_backward(it)
        ctx.shape = x.shape
        return x[:, :, it]

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        it, = ctx.saved_tensors
        return g.new_zeros(ctx.shape).index_add_(2, it.flatten(), g.flatten(2, 4)), None, None


def _slots(geo):
    """For each window slot with a key in the map for some query of the tile: (slot, tile rows, key rows, columns,
    key columns) as slices. Centred windows: slot a * kernel + b of query (i, j) is key (i, j) + dilation *
    (a - c, b - c), one shift of the map for every query; out-of-map keys are left out (their logits are -inf,
    their probability 0)."""
    r0, r1, H, W, kernel, dilation, _ = geo
    c = kernel // 2
    for a in range(kernel):
        dy = dilation * (a - c)
        i0, i1 = max(r0, -dy), min(r1, H - dy)     # tile rows whose key row is in the map
        for b in range(kernel):
            dx = dilation * (b - c)
            j0, j1 = max(0, -dx), min(W, W - dx)
            if i0 < i1 and j0 < j1:
                yield (a * kernel + b, slice(i0 - r0, i1 - r0), slice(i0 + dy, i1 + dy), slice(j0, j1),
                       slice(j0 + dx, j1 + dx))


# Window products one slot (one map shift) at a time, for centred windows: no k*k-times gathered copy of the keys /
# values (the gathers were 19% of TransNeXt-T's forward at batch 4, at ~2 GB/s, and the batched (1 x 9) @ (9 x 24)
# matmuls another 6%), and gradients summed onto the map by strided multiply-adds (autograd's backward of the
# gathers, an accumulating index_put_, is single-threaded on CPU: 9% of a TransNeXt-T training step at batch 8).
# Measured AMD EPYC, logits + outputs of a TransNeXt-T stage-3 tile at batch 4 (4, 12, 14 x 14, 3x3, d24): gathers
# and batched matmuls 2.75 ms, per slot 1.07 ms.

def _slot_dots(geo, x, m):
    """(B, h, t, W, k*k): each tile query's (``x``) dot product with its window slots' entries of the map ``m``
    (B, h, H, W, D); 0 on out-of-map slots."""
    s = x.new_zeros(*x.shape[:-1], geo[4] ** 2)
    for slot, ti, mi, tj, mj in _slots(geo):
        s[:, :, ti, tj, slot] = torch.linalg.vecdot(x[:, :, ti, tj], m[:, :, mi, mj])
    return s


def _slot_sums(geo, w, m):
    """(B, h, t, W, D): each tile query's sum over its window slots of ``w[..., slot]`` times the slot's entry of
    the map ``m`` (B, h, H, W, D)."""
    out = m.new_zeros(*w.shape[:-1], m.shape[-1])
    w = w.to(m.dtype)
    for slot, ti, mi, tj, mj in _slots(geo):
        out[:, :, ti, tj].addcmul_(w[:, :, ti, tj, slot, None], m[:, :, mi, mj])
    return out


def _slot_scatter(geo, w, x, shape):
    """The map ``shape`` (B, h, H, W, D) holding, at every key, the sum of ``w[..., slot] * x[query]`` over the tile
    queries and slots that point at it (the transpose of :func:`_slot_sums`)."""
    out = x.new_zeros(shape)
    w = w.to(x.dtype)
    for slot, ti, mi, tj, mj in _slots(geo):
        out[:, :, mi, mj].addcmul_(w[:, :, ti, tj, slot, None], x[:, :, ti, tj])
    return out


class _SlotProduct(torch.autograd.Function):
    """A tile's window products with a map ``m`` (B, h, H, W, D), one slot at a time: with ``dot``, the logits
    (:func:`_slot_dots`) of the tile's queries ``a`` (B, h, t, W, D); else the outputs (:func:`_slot_sums`) of
    the weights ``a`` (B, h, t, W, k*k). Gradients in the same per-slot form: the tile operand's by the other of
    the two, the map's by :func:`_slot_scatter`."""

    @staticmethod
    def forward(ctx, a, m, geo, dot):
        ctx.save_for_backward(a, m)
        ctx.geo, ctx.dot = geo, dot
        return _slot_dots(geo, a, m) if dot else _slot_sums(geo, a, m)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        a, m = ctx.saved_tensors
        ga = gm = None
        if ctx.needs_input_grad[0]:
            ga = (_slot_sums if ctx.dot else _slot_dots)(ctx.geo, g, m)
        if ctx.needs_input_grad[1]:
            gm = _slot_scatter(ctx.geo, *((g, a) if ctx.dot else (a, g)), m.shape)
        return ga, gm, None, None


def _tile_gather(x, rows, cols):
    """``x[:, :, rows, cols]`` (x (P, h, H, W, D); rows (n, 1, r, 1), cols (1, m, 1, c)): tiles or key regions
    (P, h, n, m, r, c, D) of the blocked path."""
    if records_grad(x) and not tracing():
        return _TileGather.apply(x, rows, cols)
    return x[:, :, rows, cols]


def _sum_into(dst, dim: int, index: torch.Tensor, positions: list, src):
    """``dst.index_add_(dim, index, src)``, as one slice add where ``positions`` (``index`` as a list) is a run of
    consecutive positions (all key regions; query tiles but the last, clamped, one)."""
    if positions == list(range(positions[0], positions[0] + len(positions))):
        dst.narrow(dim, positions[0], len(positions)).add_(src)
    else:
        dst.index_add_(dim, index, src)


class _TileGather(torch.autograd.Function):
    """``x[:, :, rows, cols]`` whose backward sums the tiles back onto the map by slice adds, one per tile column
    and one per tile row (each tile's rows and columns are a run of positions, overlapping its neighbours':
    key regions), instead of autograd's accumulating ``index_put_`` (single-threaded on CPU: 9% of the zoo's
    NAT-T training step at batch 8)."""

    @staticmethod
    def forward(ctx, x, rows, cols):
        ctx.save_for_backward(rows, cols)
        ctx.shape = x.shape
        return x[:, :, rows, cols]

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        rows, cols = ctx.saved_tensors
        P, h, H, W, D = ctx.shape
        rows, cols = rows.reshape(rows.shape[0], -1), cols.reshape(cols.shape[1], -1)     # (n, r), (m, c)
        row_list, col_list = rows.tolist(), cols.tolist()      # (one copy to the host, not one per tile)
        part = g.new_zeros(P, h, rows.shape[0], rows.shape[1], W, D)     # summed over the tile columns first
        for j, positions in enumerate(col_list):
            _sum_into(part, 4, cols[j], positions, g[:, :, :, j])
        out = g.new_zeros(P, h, H, W, D)
        for i, positions in enumerate(row_list):
            _sum_into(out, 2, rows[i], positions, part[:, :, i])
        return out, None, None


class _SlotDot(torch.autograd.Function):
    """(kg (..., k*k, D), q (..., D)) -> kg @ q (..., k*k) as one batched matmul. Autograd's backward for it
    would form the kg gradient as a batch of rank-1 matmuls ((k*k, 1) @ (1, D) per query: the slowest op of
    a TransNeXt training step on CPU); a broadcast product is the same numbers at memory speed."""

    @staticmethod
    def forward(ctx, kg, q):
        ctx.save_for_backward(kg, q)
        return (kg @ q.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, g):
        kg, q = ctx.saved_tensors
        g = g.to(kg.dtype)
        return g.unsqueeze(-1) * q.unsqueeze(-2), (g.unsqueeze(-2) @ kg).squeeze(-2)


class _SlotSum(torch.autograd.Function):
    """(p (..., k*k), vg (..., k*k, Dv)) -> p @ vg (..., Dv); the vg gradient as a broadcast product (as above)."""

    @staticmethod
    def forward(ctx, p, vg):
        ctx.save_for_backward(p, vg)
        return (p.unsqueeze(-2) @ vg).squeeze(-2)

    @staticmethod
    def backward(ctx, g):
        p, vg = ctx.saved_tensors
        g = g.to(vg.dtype)
        return (vg @ g.unsqueeze(-1)).squeeze(-1), p.unsqueeze(-1) * g.unsqueeze(-2)


_LSE_SDPA = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)


def _merge_extra(qt, s, window_sum, extra_k, extra_v, extra_bias, r0, r1, scale, ww=None):
    """One query tile: window logits s (B, h, t, W, k*k) and ``window_sum`` (weights -> the weighted sums of the
    windows' values), extra keys through SDPA (output + log-sum-exp), merged as one softmax; window weights ww added
    to the window probabilities."""
    B, h, t, W, D = qt.shape
    mask = None if extra_bias is None else G.bias_rows(extra_bias, r0, r1).flatten(2, 3).to(qt.dtype)
    o_e, lse = _LSE_SDPA(qt.flatten(2, 3), extra_k, extra_v, 0.0, False, attn_mask=mask, scale=scale)
    lse = lse.view(B, h, t, W, 1)
    m = torch.maximum(s.amax(-1, keepdim=True), lse)                       # finite: lse is
    a = torch.exp(s - m)
    a_e = torch.exp(lse - m)
    ct = torch.promote_types(qt.dtype, torch.float32)      # (half types merge in float32, float64 stays)
    if ww is None:
        o = window_sum(a).to(ct) + a_e * o_e.view(B, h, t, W, -1).to(ct)
        return (o / (a.sum(-1, keepdim=True) + a_e)).to(qt.dtype)
    inv = 1.0 / (a.sum(-1, keepdim=True) + a_e)
    return (window_sum(a * inv + ww).to(ct) + (a_e * inv) * o_e.view(B, h, t, W, -1).to(ct)).to(qt.dtype)


def _dilated(q, k, v, kernel, dilation, rpb, scale, border):
    """Each dilation group (rows a, a + d, ...; columns b, b + d, ...) is a dilation-free map. One row offset at a
    time, its column groups of one length folded into the batch and attended together (copies of 1/d of the
    map at a time, not of the whole map); the results written into the output in place."""
    if dilation == 1:
        return _blocked(q, k, v, kernel, rpb, scale, border)
    B, h, H, W, _ = q.shape
    out = q.new_empty(B, h, H, W, v.shape[-1])
    col_groups = _groups(W, dilation, q.device)
    for a in range(min(dilation, H)):
        qa, ka, va = q[:, :, a::dilation], k[:, :, a::dilation], v[:, :, a::dilation]     # (B, h, L, W, D) views
        for cols in col_groups:
            nb, M = cols.shape

            def fold(t):    # (B, h, L, nb, M, D) -> (B * nb, h, L, M, D)
                return t[:, :, :, cols].permute(0, 3, 1, 2, 4, 5).reshape(B * nb, h, t.shape[2], M, t.shape[-1])
            o = _blocked(fold(qa), fold(ka), fold(va), kernel, rpb, scale, border)
            # (every position lies in exactly one group: all of out is written)
            out[:, :, a::dilation][:, :, :, cols] = o.view(B, nb, h, -1, M, o.shape[-1]).permute(0, 2, 3, 1, 4, 5)
    return out


def _groups(n: int, d: int, device):
    """An axis' dilation groups (positions a, a + d, ...), by length: one (groups, length) index each."""
    groups = [torch.arange(a, n, d) for a in range(min(d, n))]
    return [torch.stack([g for g in groups if len(g) == size]).to(device)
            for size in sorted({len(g) for g in groups}, reverse=True)]


def _blocked(q, k, v, kernel, rpb, scale, border):
    """Dilation-free neighborhood attention of (P, h, H, W, D) maps by query tiles (see the module doc)."""
    P, h, H, W, D = q.shape
    side = TILE_SIDE
    ty = H if H <= side + kernel - 1 else side      # (a map not much wider than a window: one region)
    tx = W if W <= side + kernel - 1 else side
    qy, qx, ry, rx, slot, valid, rel = G.tiles(H, W, kernel, border, ty, tx, q.device)
    nty, ntx, T, K2 = slot.shape
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype   # softmax dtype
    R = ry.shape[1] * rx.shape[1]
    table = rpb.reshape(h, -1).to(ct) if rpb is not None else None
    out = q.new_empty(P, h, nty, ty, ntx, tx, v.shape[-1])                # the tiles' outputs, in map order
    # tile rows a chunk at a time: a chunk's logits over its regions stay about CHUNK_BYTES (cache-sized
    # buffers, reused by the allocator, where whole-map ones cost page faults on every call); its mask and
    # bias likewise (the bias of every window slot of the map is 1.5 x the map's logits)
    # (an exported graph takes the whole map at once: chunks would each be nodes, and export time grows with them)
    step = nty if torch.compiler.is_exporting() else max(1, min(nty, CHUNK_BYTES // max(1, P * h * ntx * T * R
                                                                                      * q.element_size())))
    for a in range(0, nty, step):
        b = min(nty, a + step)
        yq, xq = qy[a:b, None, :, None], qx[None, :, None, :]            # (n, ntx, ty, tx) queries
        yr, xr = ry[a:b, None, :, None], rx[None, :, None, :]            # (n, ntx, Ry, Rx) regions
        qt = _tile_gather(q, yq, xq).flatten(4, 5)                        # (P, h, n, ntx, T, D)
        kr, vr = _tile_gather(k, yr, xr).flatten(4, 5), _tile_gather(v, yr, xr).flatten(4, 5)
        idx = slot[a:b].expand(P, h, b - a, ntx, T, K2)
        add = torch.zeros(valid[a:b].shape, dtype=ct, device=q.device).masked_fill(~valid[a:b], float('-inf'))
        if table is not None:
            add = add + table[:, rel[a:b]]                                # (h, n, ntx, T, k*k)
        s = (qt @ kr.transpose(-1, -2)).gather(-1, idx).to(ct) * scale + add
        p = torch.softmax(s, dim=-1).to(v.dtype)                          # (P, h, n, ntx, T, k*k)
        full = p.new_zeros(P, h, b - a, ntx, T, R).scatter_add(-1, idx, p)
        out[:, :, a:b] = (full @ vr).view(P, h, b - a, ntx, ty, tx, -1).transpose(3, 4)
    return out.view(P, h, nty * ty, ntx * tx, -1)[:, :, :H, :W]
