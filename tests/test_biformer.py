"""BiFormer beyond the generated family tests: the official release layout, the auto_pad semantics of the
routing mixer, any input size (forward and backward), and clear errors for settings it cannot take.
The logits against the official code: tests/test_official_fixtures.py (fixture biformer_tiny_r)."""
import pytest
import timm
import torch
import torch.nn.functional as F

from mixzoo.mixers.routing import BiLevelRoutingAttention
from helpers import official_layout, randomize_, rel_err

# the official release's keys and shapes (rayleizhu/BiFormer biformer_tiny, ../shared/OFFICIAL-FACTS.md)
OFFICIAL_KEYS = {
    'downsample_layers.0.0.weight': (32, 3, 3, 3), 'downsample_layers.0.1.running_var': (32,),
    'downsample_layers.0.3.weight': (64, 32, 3, 3), 'downsample_layers.0.4.weight': (64,),
    'downsample_layers.1.0.weight': (128, 64, 3, 3), 'downsample_layers.3.1.running_mean': (512,),
    'stages.0.0.pos_embed.weight': (64, 1, 3, 3), 'stages.0.0.norm1.weight': (64,),
    'stages.0.0.attn.qkv.qkv.weight': (192, 64), 'stages.0.0.attn.qkv.qkv.bias': (192,),
    'stages.0.0.attn.lepe.weight': (64, 1, 5, 5), 'stages.0.0.attn.wo.weight': (64, 64),
    'stages.0.0.mlp.0.weight': (192, 64), 'stages.0.0.mlp.3.weight': (64, 192),
    'stages.2.7.attn.qkv.qkv.weight': (768, 256),
    'stages.3.1.attn.qkv.weight': (1536, 512), 'stages.3.1.attn.proj.weight': (512, 512),
    'stages.3.1.attn.lepe.weight': (512, 1, 5, 5), 'norm.running_var': (512,), 'head.weight': (1000, 512)}


def test_biformer_official_layout_loads(tmp_path):
    zoo = randomize_(timm.create_model('mz_biformer_tiny')).eval()
    official = official_layout('biformer', zoo.state_dict())
    assert len(official) == 264
    for k, shape in OFFICIAL_KEYS.items():
        assert tuple(official[k].shape) == shape, k
    assert 'stages.3.1.attn.qkv.bias' not in official          # stage-4 qkv has no bias
    path = tmp_path / 'biformer_tiny_in1k.pth'
    torch.save({'model': official, 'epoch': 299}, path)       # the official loader reads checkpoint['model']
    loaded = timm.create_model('mz_biformer_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), zoo(x))
    bad = dict(official)
    bad.pop('stages.1.0.attn.lepe.bias')
    torch.save({'model': bad}, path)
    with pytest.raises(ValueError, match='missing key'):
        timm.create_model('mz_biformer_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with torch.device('meta'):
        small = official_layout('biformer', timm.create_model('mz_biformer_small').state_dict())
    torch.save({'model': {k: torch.zeros(v.shape) for k, v in small.items()}}, path)
    with pytest.raises(ValueError, match='does not match mz_biformer_tiny.*unexpected key'):
        timm.create_model('mz_biformer_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize('hw', [(20, 26), (7, 9), (3, 3)])
def test_routing_pads_like_official_auto_pad(hw):
    """A map the region grid does not divide gives what the same map zero-padded at the bottom/right (after
    the norm, as the official auto_pad) gives, cropped: padded tokens are not masked, they take part in the
    region means, as keys / values, and in the LePE conv."""
    torch.manual_seed(0)
    m = randomize_(BiLevelRoutingAttention(32, 2, n_win=7, qk_dim=32, topk=4)).double().eval()
    H, W = hw
    x = torch.randn(2, H, W, 32, dtype=torch.float64)
    Hp, Wp = -(-H // 7) * 7, -(-W // 7) * 7
    with torch.no_grad():
        a = m(x)
        b = m(F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H)))[:, :H, :W]
        ref = m(x, backend='reference')
    assert a.shape == x.shape
    assert rel_err(a, b) < 1e-12
    assert rel_err(ref, b) < 1e-12


@pytest.mark.parametrize('size', [(224, 224), (250, 333)])
def test_biformer_any_size_forward_backward(size, monkeypatch):
    """The official classification model asserts multiples of 112; here any size runs, forward and backward,
    and the default routing backend agrees with `reference`."""
    zoo = randomize_(timm.create_model('mz_biformer_tiny')).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        a = zoo(x)
        monkeypatch.setenv('MIXZOO_BACKEND', 'routing:reference')
        b = zoo(x)
        monkeypatch.delenv('MIXZOO_BACKEND')
    assert a.shape == (1, 1000) and torch.isfinite(a).all()
    assert rel_err(a, b) < 1e-5
    zoo.train()
    zoo(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in zoo.parameters())


def test_biformer_dense_task_grid_and_bad_settings():
    """The official dense backbones use n_win 16 / 8; settings the model cannot take are named."""
    m = timm.create_model('mz_biformer_tiny', n_win=8, num_classes=0).eval()
    with torch.no_grad():
        feats = m.forward_intermediates(torch.randn(1, 3, 100, 150), intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 25, 38), (128, 13, 19), (256, 7, 10), (512, 4, 5)]
    with pytest.raises(ValueError, match='topk must be an int in'):
        timm.create_model('mz_biformer_tiny', n_win=3)              # top-k 16 of 9 regions
    with pytest.raises(ValueError, match='topk 0 is not supported'):
        timm.create_model('mz_biformer_tiny', topks=(1, 4, 0, -2))
    with pytest.raises(ValueError, match='multiples of head_dim'):
        timm.create_model('mz_biformer_tiny', embed_dims=(48, 128, 256, 512))


def test_biformer_release_file_found_in_the_weights_folder(tmp_path, monkeypatch):
    """pretrained=True names the official file and its OneDrive source when absent (not the link's bare
    'content'), and loads the release file ({'model': ...}) under its official name."""
    monkeypatch.setenv('MIXZOO_WEIGHTS', str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r'(?s)biformer_tiny_in1k\.pth.*api\.onedrive\.com') as e:
        timm.create_model('mz_biformer_tiny', pretrained=True)
    assert str(tmp_path / 'content') not in str(e.value)
    zoo = randomize_(timm.create_model('mz_biformer_tiny')).eval()
    torch.save({'model': official_layout('biformer', zoo.state_dict())}, tmp_path / 'biformer_tiny_in1k.pth')
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(timm.create_model('mz_biformer_tiny', pretrained=True).eval()(x), zoo(x))


def test_biformer_training_checkpoint_loads_model_not_ema(tmp_path):
    """The official training saves {'model', 'model_ema', 'args', ...} and its loader reads 'model'; timm's
    file loader alone would take 'model_ema'."""
    import argparse
    a = randomize_(timm.create_model('mz_biformer_tiny'), seed=0).eval()
    b = randomize_(timm.create_model('mz_biformer_tiny'), seed=1).eval()
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': official_layout('biformer', a.state_dict()),
                'model_ema': official_layout('biformer', b.state_dict()),
                'epoch': 299, 'args': argparse.Namespace(lr=5e-4)}, path)
    x = torch.randn(1, 3, 112, 112)
    overlay = dict(file=str(path))
    with torch.no_grad():
        m = timm.create_model('mz_biformer_tiny', pretrained=True, pretrained_cfg_overlay=overlay).eval()
        assert torch.equal(m(x), a(x))
        e = timm.create_model('mz_biformer_tiny', pretrained=True, pretrained_cfg_overlay=overlay,
                              checkpoint_entry='model_ema').eval()
        assert torch.equal(e(x), b(x))
    torch.save({'model': official_layout('biformer', a.state_dict())}, path)
    with pytest.raises(KeyError, match="no 'model_ema' entry"):
        timm.create_model('mz_biformer_tiny', pretrained=True, pretrained_cfg_overlay=overlay,
                          checkpoint_entry='model_ema')
