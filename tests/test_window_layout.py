"""Window layouts (block / grid partition, padding, key masks) and the relative-position bias
convention, checked against explicit definitions and timm's TF-MaxViT bias."""
import pytest
import torch

from mixzoo.ops.window import (crop, pad_map, pad_to_multiple, padded_size, padding_key_mask, partition,
                               relative_position_index, unpartition)


@pytest.mark.parametrize('mode', ['block', 'grid'])
@pytest.mark.parametrize('hw,win', [((14, 21), (7, 7)), ((9, 6), (3, 2)), ((5, 11), (4, 3))])
def test_partition_roundtrip_and_membership(mode, hw, win):
    x = torch.randn(2, *hw, 5)
    xp = pad_map(x, win)
    Hp, Wp = padded_size(hw, win)
    assert xp.shape[1:3] == (Hp, Wp)
    w = partition(xp, win, mode)
    nh, nw = Hp // win[0], Wp // win[1]
    assert w.shape == (2 * nh * nw, win[0] * win[1], 5)
    assert torch.equal(unpartition(w, win, (Hp, Wp), mode), xp)
    # explicit membership: window (i, j), token (a, b)
    for i, j, a, b in [(0, 0, 0, 0), (nh - 1, nw - 1, win[0] - 1, win[1] - 1), (nh // 2, 0, win[0] // 2, 1 % win[1])]:
        r, c = (i * win[0] + a, j * win[1] + b) if mode == 'block' else (a * nh + i, b * nw + j)
        assert torch.equal(w[1 * nh * nw + i * nw + j, a * win[1] + b], xp[1, r, c])


@pytest.mark.parametrize('mode', ['block', 'grid'])
def test_padding_key_mask_marks_exactly_the_padding(mode):
    hw, win = (10, 13), (4, 5)
    m = padding_key_mask(hw, win, mode)
    ones = pad_map(torch.ones(1, *hw, 1), win)
    assert torch.equal(m, partition(ones, win, mode)[..., 0].bool())
    assert m[:, 0].all(), 'every window must keep a real key'
    assert padding_key_mask((8, 10), win, mode) is None


def test_relative_position_bias_matches_timm_tf_maxvit():
    from timm.layers.pos_embed_rel import RelPosBiasTf as TimmBias
    from mixzoo.mixers import RelPosBiasTf
    for win in [(7, 7), (3, 5)]:
        t = TimmBias(win, num_heads=3)
        z = RelPosBiasTf(win, num_heads=3)
        z.relative_position_bias_table.data.copy_(t.relative_position_bias_table.data)
        assert torch.equal(z.get_bias(), t.get_bias()[0] if t.get_bias().dim() == 4 else t.get_bias())


def test_relative_position_index_convention():
    idx = relative_position_index((2, 3))
    # query (0, 0) -> key (1, 2): offset (+1, +2) -> row 1 + 1, col 2 + 2 of a 3 x 5 table
    assert idx[0, 1 * 3 + 2].item() == (1 + 1) * 5 + (2 + 2)


@pytest.mark.parametrize('dims,shape', [((1, 2), (2, 13, 10, 3)), ((2, 3), (2, 3, 13, 10))])
def test_pad_to_multiple_and_crop(dims, shape):
    """Zero padding at the end of two dims (NHWC or NCHW) and its inverse; nothing to pad returns the input."""
    x = torch.randn(shape)
    y = pad_to_multiple(x, (7, 4), dims)
    assert [y.shape[d] for d in dims] == [14, 12]
    assert torch.equal(crop(y, (13, 10), dims), x)
    assert y.count_nonzero() == x.count_nonzero()          # the padding is zeros
    assert pad_to_multiple(x, (13, 5), dims) is x
