"""Shared helpers for the test suite."""
import torch

from backbones._counting import gmacs, param_count  # noqa: F401  (re-exported for the tests)
from backbones._random import randomize_  # noqa: F401


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the scale (max |b|) of the reference."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def official_layout(family: str, state_dict):
    """A zoo state dict renamed to the family's official release layout (the inverse of its filter),
    for families whose reference is the official repository."""
    import re
    if family == 'biformer':
        return _biformer_official_layout(state_dict)
    if family == 'l2vit':
        return _l2vit_official_layout(state_dict)
    if family != 'transnext':
        raise KeyError(f'no official layout for {family}')
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r'^stages\.(\d)\.downsample\.', lambda m: f'patch_embed{int(m[1]) + 1}.', k)
        k = re.sub(r'^stages\.(\d)\.blocks\.', lambda m: f'block{int(m[1]) + 1}.', k)
        k = re.sub(r'^stages\.(\d)\.norm\.', lambda m: f'norm{int(m[1]) + 1}.', k)
        out[k.replace('head.fc.', 'head.')] = v
    return out


def _biformer_official_layout(state_dict):
    """rayleizhu/BiFormer names: downsample_layers.{i}, stages.{i}.{j}, attn.qkv.qkv / attn.wo in the routing
    stages, mlp.0 / mlp.3, head."""
    import re
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r'^stages\.(\d)\.downsample\.', r'downsample_layers.\1.', k)
        k = re.sub(r'^stages\.(\d)\.blocks\.', r'stages.\1.', k)
        if re.match(r'^stages\.[0-2]\.', k):     # (stage 4's global attention keeps attn.qkv / attn.proj)
            k = k.replace('.attn.qkv.', '.attn.qkv.qkv.').replace('.attn.proj.', '.attn.wo.')
        k = k.replace('.mlp.fc1.', '.mlp.0.').replace('.mlp.fc2.', '.mlp.3.')
        out[k.replace('head.fc.', 'head.')] = v
    return out


def _l2vit_official_layout(state_dict):
    """ChuanyangZheng/L2ViT names: downsample_layers.0.proj.proj.{0,1,3,4} (conv stem) + .norm, downsample_layers.{i}
    (LayerNorm + 2x2 conv), stages.{i}.{j}, head."""
    import re
    stem = {'conv1.conv': '0', 'conv1.bn': '1', 'conv2.conv': '3', 'conv2.bn': '4'}
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r'^stem\.(conv\d\.(?:conv|bn))\.', lambda m: f'downsample_layers.0.proj.proj.{stem[m[1]]}.', k)
        k = k.replace('stem.norm.', 'downsample_layers.0.norm.')
        k = re.sub(r'^stages\.(\d)\.downsample\.', r'downsample_layers.\1.', k)
        k = re.sub(r'^stages\.(\d)\.blocks\.', r'stages.\1.', k)
        out[k.replace('head.fc.', 'head.')] = v
    return out
