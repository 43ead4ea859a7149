"""One adapter that puts any zoo model under mmdet / mmseg as a backbone.

In a config::

    custom_imports = dict(imports=['mixzoo.mm'], allow_failed_imports=False)
    model = dict(backbone=dict(type='MixZooBackbone', model_name='mz_davit_tiny',
                               pretrained='davit_tiny.pth', out_indices=(0, 1, 2, 3)), ...)

``out_indices`` count the model's stages (0 = first stage, as mmdet's ResNet/Swin do; a stem tap
such as MaxViT's is not a stage). The forward returns a tuple of NCHW maps; ``out_channels`` and
``out_strides`` list them for the neck. Importing this module registers the class in mmdet's
and mmseg's MODELS (each only where installed) and lets torch>=2.6's ``weights_only`` loading
read mmengine's own checkpoints (see ``allow_mmengine_checkpoints``).
"""
from typing import Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmengine.logging import print_log
from torch.nn.modules.batchnorm import _BatchNorm

from . import _pretrained
from ._registry import check_model_name, family_of
from ._weights import load_state_dict, read_checkpoint

__all__ = ['MixZooBackbone', 'allow_mmengine_checkpoints']


def _out_norm(kind: Optional[str], channels: int) -> nn.Module:
    """Per-output norms that official dense-task backbones add on top of the classifier
    (PoolFormer: GroupNorm with one group, Swin/DaViT-style: LayerNorm over channels)."""
    if kind is None:
        return nn.Identity()
    if kind == 'gn':
        return nn.GroupNorm(1, channels)
    if kind == 'ln':
        return timm.layers.LayerNorm2d(channels, eps=1e-6)
    raise ValueError(f"out_norm must be None, 'gn' or 'ln', got {kind!r}")


class MixZooBackbone(BaseModule):
    """A ``mz_*`` model as a multi-scale backbone.

    Args:
        model_name: a registered zoo model (``mixzoo.list_models()``).
        pretrained: a checkpoint file in any layout the family's ``checkpoint_filter_fn`` takes
            (official release, timm, zoo; ``model``/``state_dict`` wrappers); the classifier is
            dropped; 'zoo' = the family's release checkpoint from ``$MIXZOO_WEIGHTS`` (as
            ``pretrained=True`` finds it in timm). Same as ``init_cfg=dict(type='Pretrained', checkpoint=...)``.
            Loaded by ``init_weights()`` (the Runner calls it), as mmdet's backbones do.
        out_indices: stages whose outputs are returned.
        frozen_stages: -1 freezes nothing, 0 the stem, i the stem and stages 1..i (params without
            grad, and kept in eval mode).
        norm_eval: keep every BatchNorm in eval mode while training (small detection batches).
        drop_path_rate: stochastic depth of the model (None: the model's default).
        with_cp: gradient checkpointing of the stages.
        out_norm: None, 'gn' or 'ln': a norm on each returned map (new parameters).
        init_cfg: mmengine init config; ``type='Pretrained'`` goes through the zoo's converter
            (with an optional ``prefix``, e.g. 'backbone.' to take a detector's backbone).
        **model_kwargs: passed to ``timm.create_model``.
    """

    def __init__(self, model_name: str, pretrained: Optional[str] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1, norm_eval: bool = False,
                 drop_path_rate: Optional[float] = None, with_cp: bool = False, out_norm: Optional[str] = None,
                 init_cfg: Optional[Union[dict, list]] = None, **model_kwargs):
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('MixZooBackbone: give either pretrained or init_cfg, not both')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        try:
            check_model_name(model_name)
        except ValueError as e:
            raise ValueError(f'MixZooBackbone: {e}') from None
        self.model_name = model_name
        if drop_path_rate is not None:     # (SHViT has no stochastic depth: leave it unset there)
            model_kwargs['drop_path_rate'] = drop_path_rate
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
        off = int(model.stem_is_feature)
        n_stages = len(model.stages)
        idx = [i + n_stages if i < 0 else i for i in out_indices]
        bad = [i for i in idx if not 0 <= i < n_stages]
        if bad or not idx:
            raise ValueError(f'MixZooBackbone: out_indices {tuple(out_indices)} out of range for '
                             f'{model_name}, which has {n_stages} stages (0..{n_stages - 1})')
        if not -1 <= frozen_stages <= n_stages:
            raise ValueError(f'MixZooBackbone: frozen_stages must be in -1..{n_stages}, got {frozen_stages}')
        self.out_indices = tuple(idx)
        self._taps = [i + off for i in idx]
        info = model.feature_info
        self.out_channels = [info[t]['num_chs'] for t in self._taps]
        self.out_strides = [info[t]['reduction'] for t in self._taps]
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        model.prune_intermediate_layers(self._taps, prune_norm=True, prune_head=True)
        if with_cp:
            model.set_grad_checkpointing(True)
        self.model = model
        self.out_norms = nn.ModuleList(_out_norm(out_norm, c) for c in self.out_channels)
        self._freeze_stages()

    # --- weights -------------------------------------------------------------------------
    def load_pretrained(self, path: str, prefix: str = '', prefer: str = 'model') -> None:
        """Load a checkpoint through the family's converter; mismatches raise (a checkpoint of
        another model), the classifier and the final norm are dropped."""
        if path == 'zoo':     # the family's release checkpoint, found as pretrained=True finds it
            try:
                path = str(_pretrained.resolve(self.model_name))
            except FileNotFoundError as e:   # (what to download where; and the config's own knob)
                raise FileNotFoundError(
                    f"{e}\nIn an mmdet / mmseg config: set model.backbone.pretrained to the file's path "
                    f"(--cfg-options model.backbone.pretrained=PATH), or to None to train from scratch.") from None
        sd = read_checkpoint(path, prefer=prefer)
        if prefix:
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if not sd:
                raise ValueError(f'{path}: no key starts with {prefix!r}')
        if sd and all(k.startswith(('model.', 'out_norms.')) for k in sd):
            # this adapter's own layout (e.g. a detector's backbone.* with prefix='backbone.')
            self.load_state_dict(sd, strict=True)
        else:
            # a classifier checkpoint in any layout the family takes, through the one loading path (the
            # final norm and head, pruned here, are matched and left out)
            load_state_dict(self.model, sd, family_of(self.model_name))
        print_log(f'MixZooBackbone: loaded {path} into {self.model_name}', logger='current')

    def init_weights(self) -> None:
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            self.load_pretrained(cfg['checkpoint'], prefix=cfg.get('prefix', ''))
            self._is_init = True
        elif cfg is not None:
            super().init_weights()
        # with no init_cfg the model keeps timm's initialisation from construction

    # --- training behaviour --------------------------------------------------------------
    def _frozen_modules(self):
        if self.frozen_stages < 0:
            return []
        return [self.model.stem] + list(self.model.stages[:self.frozen_stages])

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        feats = self.model.forward_intermediates(x, indices=self._taps, intermediates_only=True)
        return tuple(norm(f) for norm, f in zip(self.out_norms, feats))


def _mmengine_globals() -> list:
    """The non-tensor types mmengine puts in its checkpoints (meta, message_hub, schedulers)."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer
    core = getattr(np, '_core', None) or np.core
    types = [HistoryBuffer, np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    types += [type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64', 'int32', 'uint8', 'bool')]
    # HistoryBuffer's statistics table pickles its functions as getattr(HistoryBuffer, 'min'):
    # getattr can only fetch attributes of the allowed types here, not call them
    return types + [getattr]


def allow_mmengine_checkpoints() -> None:
    """torch>=2.6 loads with ``weights_only=True`` by default and mmengine 0.10 calls ``torch.load``
    without the argument, so resume / load_from fail on the Python objects mmengine stores in its
    own checkpoints. Replace mmengine's local-file loader with one that allows exactly those types,
    only while it reads (no process-wide allowlist, no arbitrary unpickling)."""
    import os.path as osp
    from mmengine.runner.checkpoint import CheckpointLoader

    def load_from_local(filename, map_location):
        filename = osp.expanduser(filename)
        if not osp.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        with torch.serialization.safe_globals(_mmengine_globals()):
            return torch.load(filename, map_location=map_location, weights_only=True)

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


def _register() -> None:
    for pkg in ('mmdet', 'mmseg'):
        try:
            registry = __import__(f'{pkg}.registry', fromlist=['MODELS']).MODELS
        except ImportError:
            continue
        registry.register_module(module=MixZooBackbone, force=True)


_register()
allow_mmengine_checkpoints()
