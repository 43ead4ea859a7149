"""L2ViT beyond the generated family template (tests/test_models.py): the official release container
(``model`` and ``model_ema`` entries, argparse args) through checkpoint_filter_fn, and any input size.
Logits against the official code: tests/test_official_fixtures.py (fixture l2vit_*)."""
import argparse

import pytest
import timm
import torch

from mixzoo._random import randomize_
from mixzoo._weights import read_checkpoint
from helpers import official_layout as _official_layout, rel_err

# first keys and shapes of the official release (../shared/OFFICIAL-FACTS.md, tiny)
OFFICIAL_KEYS = {
    'downsample_layers.0.proj.proj.0.weight': (48, 3, 3, 3), 'downsample_layers.0.proj.proj.1.running_var': (48,),
    'downsample_layers.0.proj.proj.3.weight': (96, 48, 3, 3), 'downsample_layers.0.proj.proj.4.weight': (96,),
    'downsample_layers.0.norm.weight': (96,), 'downsample_layers.1.norm.weight': (96,),
    'downsample_layers.1.proj.weight': (192, 96, 2, 2), 'stages.0.0.cpe.1.proj.weight': (96, 1, 3, 3),
    'stages.0.0.attn.qkv.weight': (288, 96), 'stages.0.1.attn.temperature': (3, 1, 1),
    'stages.0.1.local_mp.conv1.weight': (96, 1, 7, 7), 'stages.0.1.local_mp.bn.running_mean': (96,),
    'stages.0.1.norm3.weight': (96,), 'stages.3.1.mlp.fc2.weight': (768, 3072), 'norm.weight': (768,),
    'head.weight': (1000, 768)}


def official_layout(state_dict):
    """The zoo's keys in ChuanyangZheng/L2ViT's layout (the inverse of checkpoint_filter_fn)."""
    return _official_layout('l2vit', state_dict)


# a reduced configuration for the loading tests (both block kinds in every stage; the layout is the same)
SMALL = dict(depths=(2, 2, 2, 2), dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4))


def _load(path, **kw):
    return timm.create_model('mz_l2vit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **dict(SMALL, **kw))


def test_official_keys_and_shapes():
    with torch.device('meta'):
        official = official_layout(timm.create_model('mz_l2vit_tiny').state_dict())
    assert len(official) == 284
    for k, shape in OFFICIAL_KEYS.items():
        assert tuple(official[k].shape) == shape, k


def test_release_container_model_by_default_ema_on_request(tmp_path):
    """The release file holds 'model' and 'model_ema' (different weights) beside optimizer state and the
    argparse args: 'model' loads by default, as the official evaluation reads it (timm's own loader
    would take 'model_ema'), checkpoint_entry='model_ema' takes the EMA weights."""
    a = randomize_(timm.create_model('mz_l2vit_tiny', **SMALL), seed=1).eval()
    b = randomize_(timm.create_model('mz_l2vit_tiny', **SMALL), seed=2).eval()
    official = official_layout(a.state_dict())
    path = tmp_path / 'L2ViT-Tiny-checkpoint-best-ema.pth'
    torch.save({'model': official, 'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 'best-ema',
                'scaler': {}, 'args': argparse.Namespace(model='L2ViT_Tiny', drop_path=0.1),
                'model_ema': official_layout(b.state_dict())}, path)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        want_a, want_b = a(x), b(x)
        got = _load(path).eval()
        assert torch.equal(got(x), want_a)
        assert got.pretrained_cfg['file'] == str(path) and got.pretrained_cfg['state_dict'] is None
        assert torch.equal(_load(path, checkpoint_entry='model_ema').eval()(x), want_b)
        # a plain official state dict, the zoo's own layout, and another class count (head dropped)
        torch.save(official, tmp_path / 'plain.pth')
        assert torch.equal(_load(tmp_path / 'plain.pth').eval()(x), want_a)
        torch.save(a.state_dict(), tmp_path / 'zoo.pth')
        assert torch.equal(_load(tmp_path / 'zoo.pth').eval()(x), want_a)
        ten = _load(path, num_classes=10).eval()
        assert ten(x).shape == (1, 10) and torch.equal(ten.forward_features(x), a.forward_features(x))
    # what the mm adapter and tools/convert.py read (argparse args allowed, nothing else unpickled)
    assert read_checkpoint(str(path)).keys() == official.keys()
    assert torch.equal(read_checkpoint(str(path), prefer='model_ema')['norm.weight'], b.state_dict()['norm.weight'])
    with pytest.raises(KeyError, match="no 'model_ema' entry"):
        _load(tmp_path / 'plain.pth', checkpoint_entry='model_ema')
    with pytest.raises(ValueError, match='checkpoint_entry must be one of'):
        _load(path, checkpoint_entry='ema')
    bad = dict(official)
    bad.pop('stages.2.1.attn.temperature')
    torch.save({'model': bad}, tmp_path / 'bad.pth')
    with pytest.raises(ValueError, match='missing key.*stages.2.blocks.1.attn.temperature'):
        _load(tmp_path / 'bad.pth')


def test_pretrained_finds_the_release_file(tmp_path, monkeypatch):
    """pretrained=True looks for the release file under its GitHub name in $MIXZOO_WEIGHTS (nothing is
    downloaded) and says where to get it when it is absent."""
    monkeypatch.setenv('MIXZOO_WEIGHTS', str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r'(?s)not found locally.*L2ViT-Tiny-checkpoint-best-ema\.pth.*'
                                                r'github\.com/ChuanyangZheng/L2ViT/releases/download/v1\.0/'):
        timm.create_model('mz_l2vit_tiny', pretrained=True, **SMALL)
    a = randomize_(timm.create_model('mz_l2vit_tiny', **SMALL), seed=3).eval()
    b = randomize_(timm.create_model('mz_l2vit_tiny', **SMALL), seed=4).eval()
    torch.save({'model': official_layout(a.state_dict()), 'model_ema': official_layout(b.state_dict())},
               tmp_path / 'L2ViT-Tiny-checkpoint-best-ema.pth')
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(timm.create_model('mz_l2vit_tiny', pretrained=True, **SMALL).eval()(x), a(x))
        ema = timm.create_model('mz_l2vit_tiny', pretrained=True, checkpoint_entry='model_ema', **SMALL).eval()
        assert torch.equal(ema(x), b(x))


@pytest.mark.parametrize('size', [(224, 224), (256, 320), (33, 47)])
def test_any_size(size):
    """Sizes that need every kind of padding (stem to /4, downsamples to even, windows to /7; 1024, a
    dense-task map: test_robustness)."""
    zoo = timm.create_model('mz_l2vit_tiny').eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        a, feats = zoo.forward_intermediates(x)
        logits = zoo.forward_head(a)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    assert [tuple(f.shape[2:]) for f in feats] == [(-(-size[0] // r), -(-size[1] // r)) for r in (4, 8, 16, 32)]


def test_small_size_backends_agree_and_backward(monkeypatch):
    """The default op backends and `reference` agree at a size where every stage pads (its 97x131 twin is
    in test_models); backward reaches every parameter."""
    zoo = randomize_(timm.create_model('mz_l2vit_tiny')).eval()
    x = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        a = zoo(x)
        monkeypatch.setenv('MIXZOO_BACKEND', 'reference')
        b = zoo(x)
        monkeypatch.delenv('MIXZOO_BACKEND')
    assert rel_err(a, b) < 1e-5
    zoo.train()
    zoo(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in zoo.parameters())
