"""NAT (SHI-Labs/Neighborhood-Attention-Transformer, classification/nat.py), run on NATTEN 0.17.5 (its last
release with CPU kernels and the relative-position bias; built from the PyPI sdist with the C++ standard
raised to 20 for torch 2.14's headers, and two Python-side fixes for torch 2.14: ``torch.cuda._device_t`` is
gone, and natten/utils/testing.py calls ``get_device_cc()`` at import).

NATTEN 0.17.5 refuses maps smaller than kernel x dilation, so the fixture sizes keep every stage at least
kernel wide: 224 (the released size, a 7x7 map in stage 4) and 224x288. The reduced configuration keeps
the released kernel (7), head dim 32 where the width allows, layer scale (as NAT-S / NAT-B), qkv bias and
the two-conv tokenizer; widths and depths are cut to keep the file small.
"""
import sys

REPO = 'SHI-Labs/Neighborhood-Attention-Transformer'
WRAPPER = None     # the release files are plain state dicts (the official loader: model.load_state_dict(ckpt))

_REDUCED = dict(depths=[2, 2, 2, 1], num_heads=[1, 1, 2, 4], embed_dim=16, mlp_ratio=2., layer_scale=1e-5,
                num_classes=16)
FIXTURES = {
    'nat_mini_r': dict(zoo='mz_nat_mini', zoo_kwargs=dict(_REDUCED), official_kwargs=dict(_REDUCED),
                       sizes=[(224, 224), (224, 288)], batch=1),
}


def module(repo: str, name: str):
    """classification/<name>.py of the official repository (dinat.py imports nat.py as ``nat``)."""
    path = f'{repo}/classification'
    if path not in sys.path:
        sys.path.insert(0, path)
    return __import__(name)


def build_official(repo: str, official_kwargs: dict, size: tuple):
    return module(repo, 'nat').NAT(drop_path_rate=0., **official_kwargs)


# NATTEN 0.17.5's CPU kernels take float32 / float64 only, and on another dtype (bf16 under autocast) print "NATTEN
# does not support data type BFloat16 yet." and end the process (a C++ exit, no exception to catch): on CPU the
# benchmark times the official model in these only
CPU_DTYPES = ('float32', 'float64')

VARIANTS = {v: f'mz_nat_{v}' for v in ('mini', 'tiny', 'small', 'base')}


def build_variant(repo: str, variant: str, size: tuple):
    """The released architecture ``nat_<variant>`` (its own drop-path rate: the comparison runs in eval mode)."""
    return getattr(module(repo, 'nat'), f'nat_{variant}')()


# op anchor for tools/official_bench.py: NATTEN's CPU kernels (na2d_qk with rpb, softmax, na2d_av: what NAT's
# module runs) beside the zoo's op at NAT-T's stage shapes (B, heads, H, W, head dim), float32
OP_NAME = 'neighborhood attention (border shift, rpb)'
OP_SHAPES = {f'{label}: {B}x{h}x{H}x{H}x32, k7 d{d}': dict(
    tensors=[(B, h, H, H, 32)] * 3 + [(h, 13, 13)], kwargs=dict(kernel=7, dilation=d))
    for label, B, h, H, d in (('NAT-T stage 1', 8, 2, 56, 1), ('NAT-T stage 3', 8, 8, 14, 1),
                              ('DiNAT-T stage 1', 8, 2, 56, 8))}


def official_op(q, k, v, rpb, kernel, dilation):
    from natten.functional import na2d_av, na2d_qk
    return na2d_av(na2d_qk(q * 32 ** -0.5, k, kernel, dilation, rpb=rpb).softmax(-1), v, kernel, dilation)


def zoo_op(q, k, v, rpb, kernel, dilation):
    from mixzoo.ops import neighborhood_attention
    return neighborhood_attention(q, k, v, kernel, dilation, rpb=rpb, border='shift')
