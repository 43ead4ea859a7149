"""The stage-walking part of the timm model API, shared by the hierarchical families.

A family model sets ``self.stem``, ``self.stages`` (an nn.Sequential of stages, each with a
``grad_checkpointing`` flag and ``blocks``), ``self.norm`` (final norm, may be Identity) and
``self.feature_info``; ``stem_is_feature`` says whether the stem output is feature index 0
(as timm's MaxViT does) or features are the stages only (PoolFormer).
"""
import contextlib
import functools
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import NormMlpClassifierHead
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices


class Stage(nn.Module):
    """A sequence of blocks after an optional downsample, with gradient checkpointing."""

    def __init__(self, blocks: List[nn.Module], downsample: Optional[nn.Module] = None):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


@contextlib.contextmanager
def factory(device=None, dtype=None):
    """Tensors created on ``device`` in ``dtype`` (timm's factory keywords): a model built inside is
    constructed there, parameters and buffers alike, with no round trip through CPU memory."""
    with contextlib.ExitStack() as stack:
        if device is not None:
            stack.enter_context(torch.device(device))
        if dtype is not None:
            if not dtype.is_floating_point:
                raise TypeError(f'dtype must be a floating point type, got {dtype}')
            stack.callback(torch.set_default_dtype, torch.get_default_dtype())
            torch.set_default_dtype(dtype)
        yield


class StagedModelMixin:
    """Every family's model class. Its ``__init__`` also takes timm's ``device=`` / ``dtype=`` keywords (added
    here for each subclass: the constructor runs inside ``factory(device, dtype)``)."""
    stem_is_feature = False
    min_input_size = (32, 32)   # smallest H, W the family supports (one token after the last stage)
    # On CPU the convolutions (oneDNN) run 1.2-1.4x faster on channels_last maps: the input is
    # converted once (conv outputs keep the layout) and returned maps are made NCHW-contiguous
    # again, so callers see timm's layout. Same values up to float rounding.
    cpu_channels_last = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get('__init__')
        if init is None:
            return

        @functools.wraps(init)
        def __init__(self, *args, device=None, dtype=None, **kw):
            with factory(device, dtype):
                init(self, *args, **kw)
        cls.__init__ = __init__

    def _to_internal(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_channels_last and x.device.type == 'cpu':
            return x.contiguous(memory_format=torch.channels_last)
        return x

    @staticmethod
    def _to_external(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()

    def _check_input(self, x: torch.Tensor) -> None:
        """Clear errors for inputs the model cannot take (rather than a shape error deep inside)."""
        name = (getattr(self, 'pretrained_cfg', None) or {}).get('architecture') or type(self).__name__
        if x.ndim != 4:
            raise ValueError(f'{name}: expected a 4-D (B, C, H, W) image batch, got shape {tuple(x.shape)}')
        if x.shape[1] != self.in_chans:
            raise ValueError(f'{name}: expected {self.in_chans} input channels, got {x.shape[1]} '
                             f'(input shape {tuple(x.shape)})')
        if not x.is_floating_point():
            raise TypeError(f'{name}: expected a floating point input, got {x.dtype}')
        mh, mw = self.min_input_size
        if x.shape[2] < mh or x.shape[3] < mw:
            raise ValueError(f'{name}: input {x.shape[2]}x{x.shape[3]} is below the minimum size {mh}x{mw}')

    def _num_feature_taps(self) -> int:
        return len(self.stages) + int(self.stem_is_feature)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^stages\.(\d+)\.downsample', (0,)), (r'^stages\.(\d+)\.blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    @torch.jit.ignore
    def no_weight_decay(self):
        """Nothing beyond what timm's optimizer factory exempts anyway (biases, norms); families whose
        official training exempts more override this."""
        return set()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, reset_other: bool = False):
        """For timm's heads (``head.reset``): NormMlpClassifierHead (its hidden layer and norm go with
        ``reset_other``) and ClassifierHead; other heads override."""
        self.num_classes = num_classes
        if isinstance(self.head, NormMlpClassifierHead):
            self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features)
            self.head_hidden_size = self.head.num_features
        else:
            self.head.reset(num_classes, global_pool)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stem(self._to_internal(x))
        x = self.stages(x)
        return self._to_external(self.norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the stages in ``indices`` (timm semantics); ``norm`` applies the final norm
        to the last stage's map when it is taken."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        n = self._num_feature_taps()
        take, max_index = feature_take_indices(n, indices)
        off = int(self.stem_is_feature)
        out = []
        self._check_input(x)
        x = self.stem(self._to_internal(x))
        if off and 0 in take:
            out.append(self._to_external(x))
        stages = self.stages if not stop_early or torch.jit.is_scripting() else self.stages[:max_index + 1 - off]
        last = n - 1
        for i, stage in enumerate(stages):
            idx = i + off
            x = stage(x)
            if idx in take:
                out.append(self._to_external(self.norm(x) if norm and idx == last else x))
        if intermediates_only:
            return out
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return self._to_external(x), out

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True):
        before = set(self.state_dict())
        n = self._num_feature_taps()
        take, max_index = feature_take_indices(n, indices)
        off = int(self.stem_is_feature)
        self.stages = self.stages[:max_index + 1 - off]
        prune_end = max_index < n - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '', reset_other=True)
        # what a checkpoint of the whole model may hold beyond this model (mixzoo._weights drops it)
        self.pruned_keys = frozenset(before - set(self.state_dict())) | getattr(self, 'pruned_keys', frozenset())
        return take
