"""DiNAT (SHI-Labs/Neighborhood-Attention-Transformer, classification/dinat.py: NAT with per-block dilations),
run on NATTEN 0.17.5 as tools/official/nat.py says.

The reduced configurations keep dilations above 1 in three stages: ``dinat_mini_r`` the released pattern
(dilation 1 on even blocks, 8 / 4 / 2 on odd ones, kernel 7) at 224, where every dilated layer spans its
whole map (7 x 8 = 56, ...), and at 256x288, where it does not; ``dinat_k5_r`` kernel 5 with dilations 4 /
3 / 2 that divide no map evenly (sizes 160 and 176x224, stage maps 40 / 20 / 10 / 5 and 44x56 ...), so the
inward shift happens inside dilation groups of unequal lengths.
"""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location('mixzoo_official_nat_recipe', Path(__file__).with_name('nat.py'))
_nat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_nat)

REPO = _nat.REPO
WRAPPER = _nat.WRAPPER
CPU_DTYPES = _nat.CPU_DTYPES

_MINI = dict(depths=[2, 2, 2, 1], num_heads=[1, 1, 2, 4], embed_dim=16, mlp_ratio=3.,
             dilations=[[1, 8], [1, 4], [1, 2], [1]], num_classes=16)
_K5 = dict(depths=[2, 2, 2, 1], num_heads=[1, 1, 2, 4], embed_dim=16, mlp_ratio=2., kernel_size=5,
           dilations=[[1, 4], [3, 1], [1, 2], [1]], num_classes=16)
FIXTURES = {
    'dinat_mini_r': dict(zoo='mz_dinat_mini', zoo_kwargs=dict(_MINI), official_kwargs=dict(_MINI),
                         sizes=[(224, 224), (256, 288)], batch=1),
    'dinat_k5_r': dict(zoo='mz_dinat_mini', zoo_kwargs=dict(_K5), official_kwargs=dict(_K5),
                       sizes=[(160, 160), (176, 224)], batch=1),
}


def build_official(repo: str, official_kwargs: dict, size: tuple):
    return _nat.module(repo, 'dinat').DiNAT(drop_path_rate=0., **official_kwargs)


VARIANTS = {v: f'mz_dinat_{v}' for v in ('mini', 'tiny', 'small', 'base', 'large')}


def build_variant(repo: str, variant: str, size: tuple):
    """The released architecture ``dinat_<variant>`` (its own drop-path rate: the comparison runs in eval mode)."""
    return getattr(_nat.module(repo, 'dinat'), f'dinat_{variant}')()
