"""The family test template, generated from the zoo's model registry (mixzoo.MODELS).

For every variant whose reference is timm: timm's model with random weights (BN statistics and
zero-initialised parameters randomised too) is saved to a file and loaded into the zoo through
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``; logits must
match in eval mode at the native size and at a second size. Parameter count equal to timm's,
GMACs within 2% of the published figure, forward_intermediates == forward_features, features_only
maps and feature_info, backward reaching every parameter, gradient checkpointing equal.
Variants flagged build_only (the largest) are built on the meta device and counted only."""
import pytest
import timm
import torch

import mixzoo
from mixzoo import FAMILIES, MODELS
from helpers import first_variants, gmacs, official_layout, param_count, randomize_, rel_err

TIMM = {n: m for n, m in MODELS.items() if m.reference.startswith('timm:')}
# families whose reference is the official repository: their model API, training and any-size tests
# run here; the logits check needs the official code (tests/fixtures, when available)
OFFICIAL = {n: m for n, m in MODELS.items() if m.reference.startswith('official:')}
RUN = [n for n, m in MODELS.items() if not m.build_only]


def _marks(name):
    return [pytest.mark.slow] if MODELS[name].slow else []


def _run_params():
    return [pytest.param(n, marks=_marks(n), id=n) for n in RUN]


def _timm_run_params():
    return [pytest.param(n, marks=_marks(n), id=n) for n in RUN if n in TIMM]


FIRST = first_variants()    # one small variant per family


def _timm_name(name):
    return MODELS[name].reference.split(':', 1)[1]


@pytest.fixture(scope='module')
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('ckpt')


def _reference_and_zoo(name, ckpt_dir, **kwargs):
    ref = randomize_(timm.create_model(_timm_name(name), **kwargs)).eval()
    path = ckpt_dir / f'{name}.pth'
    torch.save(ref.state_dict(), path)
    zoo = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
    return ref, zoo


def test_registry_lists_every_registered_model():
    zoo_in_timm = set(timm.list_models('mz_*'))
    assert set(mixzoo.list_models()) == zoo_in_timm
    assert {'poolformer', 'maxvit'} <= set(mixzoo.families())
    for name in zoo_in_timm:
        assert not name.startswith('mz_') or name[3:] not in MODELS, name


@pytest.mark.parametrize('name', _timm_run_params())
def test_logits_match_reference(name, ckpt_dir):  # (timm references; official ones: fixtures)
    ref, zoo = _reference_and_zoo(name, ckpt_dir)
    s = MODELS[name].img_size
    sizes = [(s, s), FAMILIES[MODELS[name].family].second_size(s)]
    for i, hw in enumerate(sizes):
        x = torch.randn(2 if i == 0 and name in FIRST.values() else 1, 3, *hw)    # a batch: once per family
        with torch.no_grad():
            a, b = zoo(x), ref(x)
        assert a.shape == b.shape == (x.shape[0], 1000)
        err = rel_err(a, b)
        assert err <= 1e-4, f'{name} at {hw}: max |zoo - timm| = {err:.2e} of the logits scale'


@pytest.mark.parametrize('name', [pytest.param(n, id=n) for n in OFFICIAL])
def test_official_params_keys_and_gmacs(name):
    """Same parameter count and state-dict size as the official model (measured with its code), and
    GMACs within 2% of the published figure."""
    info = MODELS[name]
    with torch.device('meta'):
        zoo = timm.create_model(name)
    assert info.official_params and info.official_keys, f'{name}: no official figures in its family record'
    assert param_count(zoo) == info.official_params
    assert len(zoo.state_dict()) == info.official_keys
    g = gmacs(zoo, (info.img_size, info.img_size))
    assert abs(g - info.gmacs) / info.gmacs <= 0.02, f'{name}: {g:.3f} GMACs vs published {info.gmacs}'


@pytest.mark.parametrize('name', [pytest.param(n, id=n) for n in TIMM])
def test_params_and_gmacs(name):
    info = MODELS[name]
    with torch.device('meta'):
        zoo = timm.create_model(name)
        ref = timm.create_model(_timm_name(name))
    assert param_count(zoo) == param_count(ref)
    assert set(zoo.state_dict()) == set(ref.state_dict())
    if info.params_m is not None:
        assert abs(param_count(zoo) / 1e6 - info.params_m) / info.params_m < 0.05
    size = (info.img_size, info.img_size)
    (g, ops), (g_ref, ops_ref) = gmacs(zoo, size, by_op=True), gmacs(ref, size, by_op=True)
    # the convolutions cost exactly timm's; attention may count a little differently (timm counts its
    # einsum relative-position lookup as matmul work), within 2% either way: the architecture is the same
    assert abs(ops.get('convolution', 0) - ops_ref.get('convolution', 0)) <= 1e-6 * g_ref, (ops, ops_ref)
    assert g_ref * 0.98 <= g <= g_ref * 1.02, f'{name}: {g:.3f} GMACs vs timm {g_ref:.3f}'
    if info.gmacs is not None:
        assert abs(g - info.gmacs) / info.gmacs <= info.gmacs_tol, f'{name}: {g:.3f} GMACs vs published {info.gmacs}'


@pytest.mark.parametrize('name', _run_params())
def test_intermediates_and_features_only(name):
    zoo = randomize_(timm.create_model(name)).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        feats = zoo.forward_features(x)
        last, inter = zoo.forward_intermediates(x)
        only = zoo.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
    assert torch.allclose(last, feats, atol=1e-6)
    info = zoo.feature_info
    assert len(inter) == len(info)
    for t, fi in zip(inter, info):
        assert t.shape[1] == fi['num_chs']
        assert t.shape[2] == -(-96 // fi['reduction']) and t.shape[3] == -(-128 // fi['reduction'])
    assert torch.equal(only[0], inter[0]) and torch.equal(only[1], inter[-1])

    fo = timm.create_model(name, features_only=True, out_indices=(1, 2)).eval()
    missing, _ = fo.model.load_state_dict(zoo.state_dict(), strict=False)   # pruned stages/head are unexpected
    assert not missing, missing
    with torch.no_grad():
        maps = fo(x)
    assert [m.shape[1] for m in maps] == fo.feature_info.channels() == [info[1]['num_chs'], info[2]['num_chs']]
    assert fo.feature_info.reduction() == [info[1]['reduction'], info[2]['reduction']]
    for m, t in zip(maps, (inter[1], inter[2])):
        assert torch.allclose(m, t, atol=1e-5)


@pytest.mark.parametrize('name', _run_params())
def test_backward_and_grad_checkpointing(name):
    zoo = randomize_(timm.create_model(name, num_classes=10)).train()
    x = torch.randn(2, 3, 64, 64)
    out = zoo(x)
    out.square().mean().backward()
    missing = [n for n, p in zoo.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f'no (finite) gradient for {missing[:5]}'
    grads = {n: p.grad.clone() for n, p in zoo.named_parameters()}
    zoo.zero_grad(set_to_none=True)
    zoo.set_grad_checkpointing(True)
    out2 = zoo(x)
    out2.square().mean().backward()
    # BN batch statistics are recomputed identically under checkpointing; outputs must agree
    assert torch.allclose(out2, out, atol=1e-5, rtol=1e-5)
    worst = max(rel_err(p.grad, grads[n]) for n, p in zoo.named_parameters())
    assert worst < 1e-4


@pytest.mark.parametrize('name', [pytest.param(n, id=n) for n in TIMM])
def test_preprocessing_cfg_matches_reference(name):
    """Evaluation preprocessing must be the reference's, or published accuracy is not reproduced."""
    from timm.models import get_pretrained_cfg
    ref_name = MODELS[name].reference.split(':', 1)[1]
    tags = [n for n in timm.list_pretrained(ref_name + '.*') if n.split('.')[0] == ref_name]
    if not tags:
        return   # the reference has no released weights (and so no evaluation preprocessing)
    ref = get_pretrained_cfg(tags[0]).to_dict()
    zoo = timm.models.get_pretrained_cfg(name).to_dict()
    for key in ('input_size', 'crop_pct', 'crop_mode', 'interpolation', 'mean', 'std'):
        assert tuple(zoo[key]) == tuple(ref[key]) if isinstance(ref[key], (tuple, list)) else zoo[key] == ref[key], \
            (key, zoo[key], ref[key])


@pytest.mark.parametrize('name', _run_params())
def test_default_cfg_is_complete(name):
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    for key in ('mean', 'std', 'crop_pct', 'interpolation', 'input_size', 'first_conv', 'classifier'):
        assert cfg.get(key) is not None, key
    m = timm.create_model(name)
    assert m.get_submodule(cfg['first_conv']).in_channels == 3
    assert m.get_submodule(cfg['classifier']).out_features == 1000
    m.reset_classifier(7)
    assert m.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def _names(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _default_cfgs_params():
    """Every fully tested model, and of the build_only ones one per (family, input size) (a family's variants
    share their head code; the input size sets the cfg's pool_size)."""
    built = {}
    for n, m in MODELS.items():
        if m.build_only:
            built.setdefault((m.family, m.img_size), n)
    return _run_params() + [pytest.param(n, marks=pytest.mark.slow, id=n) for n in built.values()]


@pytest.mark.parametrize('name', _default_cfgs_params())
def test_model_default_cfgs(name):
    """timm's own contract (timm's tests/test_models.py, test_model_default_cfgs), at the cfg's input size:
    forward_features gives the (num_features, *pool_size) map, forward_head(pre_logits=True) head_hidden_size
    vectors; reset_classifier(0) pools to those vectors, reset_classifier(0, '') and
    create_model(num_classes=0, global_pool='') give the unpooled map; the cfg's classifier and first_conv
    name parameters; the cfg's pool_size is the timm reference's. Run on the meta device (the models' own
    code, shapes without arithmetic); each family's first variant also runs forward_features on CPU, where
    the device-dependent paths (channels-last layouts, compiled kernels) run."""
    info = MODELS[name]
    meta = torch.device('meta')
    with meta:
        model = timm.create_model(name).eval()
    assert model.num_classes == 1000 and model.num_features > 0 and model.head_hidden_size > 0
    cfg, keys = model.default_cfg, model.state_dict().keys()
    for c in _names(cfg['classifier']) + _names(cfg['first_conv']):
        assert c + '.weight' in keys, f'{name}: cfg names {c!r}, which is not a parameter of the model'
    pool = tuple(cfg['pool_size'])
    if info.reference.startswith('timm:'):
        assert pool == tuple(timm.get_pretrained_cfg_value(_timm_name(name), 'pool_size'))
    x = torch.randn(1, *cfg['input_size'], device=meta)
    unpooled = (1, model.num_features, *pool)
    # the whole forward after each head change on each family's first variant; on the others the head on
    # the features (forward == forward_head(forward_features) is the family's code, checked by the logits)
    first = name in FIRST.values()
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape == unpooled
        assert pre.shape == (1, model.head_hidden_size)

        def out(m):
            return m(x) if first else m.forward_head(feats)
        model.reset_classifier(0)
        assert model.num_classes == 0 and out(model).shape == pre.shape
        model.reset_classifier(0, '')
        assert out(model).shape == unpooled, 'reset_classifier(0, "") must give the unpooled map'
        with meta:
            bare = timm.create_model(name, num_classes=0, global_pool='').eval()
        assert out(bare).shape == unpooled, 'create_model(num_classes=0, global_pool="") must give the unpooled map'
        if first:
            cpu = timm.create_model(name).eval()
            assert cpu.forward_features(torch.randn(1, *cfg['input_size'])).shape == unpooled


# reset_classifier calls in order (each on the model as the previous one left it): the pooling is kept when
# not given, '' passes the map through, other pools change the pooled width or not as timm's do
HEAD_RESETS = [(0, None), (0, ''), (0, 'max'), (0, None), (3, 'avg'), (5, None), (0, 'avgmax'), (0, 'catavgmax')]


@pytest.mark.parametrize('name', [n for n in FIRST.values() if n in TIMM])
def test_head_api_matches_reference(name):
    """The head calls of timm's API on zoo and timm models with the same weights, fed the same feature map
    (a family's variants share their head code): the same outputs (pre-logits, pooled, unpooled, new
    classifiers), num_classes / num_features / head_hidden_size, the new layers in the model's mode; a call
    timm refuses is refused; create_model(num_classes=0, global_pool='') builds the same head."""
    ref = timm.create_model(_timm_name(name)).eval()
    zoo = timm.create_model(name).eval()
    zoo.load_state_dict(ref.state_dict())
    pool = zoo.default_cfg['pool_size']
    feats = torch.randn(2, zoo.num_features, *pool)

    def same(what, a, b):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5, f'{name} {what}: {tuple(a.shape)} vs timm {tuple(b.shape)}'
        attrs = [(m.num_classes, m.num_features, m.head_hidden_size) for m in (zoo, ref)]
        assert attrs[0] == attrs[1], f'{name} {what}: (num_classes, num_features, head_hidden_size) {attrs}'
        assert not any(m.training for m in zoo.modules()), f'{name} {what}: layers left in training mode'

    with torch.no_grad():
        same('forward_head(pre_logits=True)', zoo.forward_head(feats, pre_logits=True),
             ref.forward_head(feats, pre_logits=True))
        for num_classes, pool_type in HEAD_RESETS:
            try:
                ref.reset_classifier(num_classes, pool_type)
            except (AssertionError, ValueError):
                with pytest.raises((AssertionError, ValueError), match='(?i)pool'):   # timm's own heads assert
                    zoo.reset_classifier(num_classes, pool_type)
                break   # timm's model is left half reset
            zoo.reset_classifier(num_classes, pool_type)
            zoo.load_state_dict(ref.state_dict())        # a new classifier's random weights
            same(f'reset_classifier({num_classes}, {pool_type!r})', zoo.forward_head(feats), ref.forward_head(feats))
        ref, zoo = (timm.create_model(n, num_classes=0, global_pool='').eval() for n in (_timm_name(name), name))
        zoo.load_state_dict(ref.state_dict())
        same("create_model(num_classes=0, global_pool='')", zoo.forward_head(feats), ref.forward_head(feats))


@pytest.mark.parametrize('name', _run_params())
def test_odd_size_runs_and_backends_agree(name):
    """Sizes no window divides: padded, padded keys masked, cropped back; on that path the default op
    backends compute the same function as `reference`, within bounds that neither the thread count
    nor the luck of the random weights reaches.

    The weights: randomize_'s, pulled halfway back to their initialisation (every term still
    perturbed). At full strength some are ill-conditioned: halonet_h1's 19 attention blocks amplify
    a 1e-7 op error to ~1e-2 in float32 for every backend, by an amount that depends on the rounding
    (the thread count), so no bound between two float32 backends is sound there. Halfway, every
    model's float32 `reference` is within 1e-6 of float64; that is asserted, not assumed.
    float64: the default backends (`torch` where the fast one is float32-only) against `reference`.
    float32 (the C halo kernel's dtype: the default for CPU inference): the default backends
    against float64."""
    from mixzoo.ops import forcing
    zoo = timm.create_model(name).eval()
    init = {k: t.clone() for k, t in zoo.state_dict().items() if t.is_floating_point()}
    randomize_(zoo)
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        for k, t in zoo.state_dict().items():
            if k in init:
                t.lerp_(init[k], 0.5)
        zoo.double()
        a64 = zoo(x.double())
        with forcing('reference'):
            exact = zoo(x.double())
        zoo.float()
        a = zoo(x)
        with forcing('reference'):
            b = zoo(x)
    assert torch.isfinite(a64).all() and torch.isfinite(a).all()
    # 1e-10 of the logits: every backend is at 1e-15..1e-11; a slip on the odd-size path (a padded key
    # let in, a wrong crop) is 1e-3 or more
    assert rel_err(a64, exact) < 1e-10, f'float64: the default backends are {rel_err(a64, exact):.1e} from reference'
    # float32: 2e-7..1e-6 from float64 for every model and backend, 1 or 2 threads
    cond = rel_err(b, exact)
    assert cond < 1e-5, f'float32 reference is {cond:.1e} from float64: the test\'s weights are ill-conditioned'
    assert rel_err(a, exact) < 1e-5, f'float32: the default backends are {rel_err(a, exact):.1e} from float64'


@pytest.mark.parametrize('name', sorted(FIRST.values()))
def test_full_checkpoint_loads_into_other_heads(name, tmp_path):
    """A whole-model checkpoint loads as timm's loader would into a model built with num_classes=0 (the
    head, classifier and whatever beside it, left out: SHViT's BatchNorm1d) and with another class count
    (a fresh classifier); the pooled features equal the full model's."""
    full = randomize_(timm.create_model(name)).eval()
    path = tmp_path / f'{name}.pth'
    torch.save(full.state_dict(), path)
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        want = full.forward_head(full.forward_features(x), pre_logits=True)
        for classes in (0, 7):
            m = timm.create_model(name, num_classes=classes, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path))).eval()
            assert rel_err(m.forward_head(m.forward_features(x), pre_logits=True), want) < 1e-6
            assert m(x).shape == ((1, m.num_features) if classes == 0 else (1, classes))


def test_poolformer_original_release_layout_loads(tmp_path):
    """sail-sg/poolformer's own key layout (network.*, patch_embed, layer_scale_1) goes through
    checkpoint_filter_fn to the same logits."""
    ref = randomize_(timm.create_model('poolformer_s12')).eval()
    orig = FAMILIES['poolformer'].renames.to_official(ref.state_dict())
    assert 'network.0.0.layer_scale_1' in orig and 'network.1.proj.weight' in orig
    path = tmp_path / 'poolformer_s12.pth.tar'
    torch.save({'state_dict': orig}, path)
    zoo = timm.create_model('mz_poolformer_s12', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(zoo(x), ref(x)) < 1e-5


@pytest.mark.parametrize('name', [n for n in RUN if MODELS[n].family == 'shvit'])
def test_shvit_fuse_keeps_logits(name):
    zoo = randomize_(timm.create_model(name)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = zoo(x)
        zoo.fuse()
        after = zoo(x)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)) for m in zoo.modules())
    assert rel_err(after, before) < 1e-5


def test_shvit_official_release_layout_loads(tmp_path):
    """ysj9909/SHViT names (blocks1..3, merge blocks inside them), {'model': ...} wrapper and 1x1
    conv weights stored 2-D load through checkpoint_filter_fn to the same logits."""
    ref = randomize_(timm.create_model('shvit_s1')).eval()
    orig = FAMILIES['shvit'].renames.to_official(ref.state_dict())
    for k, v in orig.items():
        if k.endswith('qkv.c.weight') or k.endswith('pw1.c.weight'):
            orig[k] = v[:, :, 0, 0]      # stored 2-D, as some release tensors are
    assert 'blocks2.1.conv1.c.weight' in orig and 'blocks3.3.mixer.m.qkv.c.weight' in orig
    path = tmp_path / 'shvit_s1.pth'
    torch.save({'model': orig, 'epoch': 299}, path)
    zoo = timm.create_model('mz_shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(zoo(x), ref(x)) < 1e-5


def test_davit_official_release_layout_loads(tmp_path):
    """dingmyu/davit names (patch_embeds, main_blocks, cpe.0/1, norms, head) load to the same logits."""
    ref = randomize_(timm.create_model('davit_tiny')).eval()
    orig = FAMILIES['davit'].renames.to_official(ref.state_dict())
    assert 'main_blocks.2.1.1.cpe.1.proj.weight' in orig and 'patch_embeds.3.proj.weight' in orig
    path = tmp_path / 'davit_tiny.pth'
    torch.save({'state_dict': orig}, path)
    zoo = timm.create_model('mz_davit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(zoo(x), ref(x)) < 1e-5


# ---- TransNeXt: official layout and any input size -------------------------------------------

# the official release's first keys and shapes (../shared/OFFICIAL-FACTS.md, micro)
TRANSNEXT_FIRST_KEYS = {
    'patch_embed1.proj.weight': (48, 3, 7, 7), 'patch_embed1.norm.weight': (48,),
    'block1.0.norm1.weight': (48,), 'block1.0.attn.temperature': (2, 1, 1),
    'block1.0.attn.query_embedding': (2, 1, 24), 'block1.0.attn.relative_pos_bias_local': (2, 9),
    'block1.0.attn.learnable_tokens': (2, 24, 9), 'block1.0.attn.learnable_bias': (2, 1, 9),
    'block1.0.attn.q.weight': (48, 48), 'block1.0.attn.kv.weight': (96, 48), 'block1.0.attn.sr.weight': (48, 48, 1, 1),
    'block1.0.attn.cpb_fc1.weight': (512, 2), 'block1.0.attn.cpb_fc2.weight': (2, 512),
    'block1.0.mlp.dwconv.dwconv.weight': (256, 1, 3, 3), 'norm1.weight': (48,),
    'block4.0.attn.qkv.weight': (1152, 384), 'block4.0.attn.temperature': (16, 1, 1), 'head.weight': (1000, 384)}


def test_transnext_official_layout_loads(tmp_path):
    zoo = randomize_(timm.create_model('mz_transnext_micro')).eval()
    official = official_layout('transnext', zoo.state_dict())
    for k, shape in TRANSNEXT_FIRST_KEYS.items():
        assert tuple(official[k].shape) == shape, k
    path = tmp_path / 'transnext_micro_224_1k.pth'
    torch.save(official, path)                       # the HF release is a plain state dict
    loaded = timm.create_model('mz_transnext_micro', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), zoo(x))
    bad = dict(official)
    bad.pop('block1.0.attn.learnable_tokens')
    torch.save(bad, path)
    with pytest.raises(ValueError, match='missing key'):
        timm.create_model('mz_transnext_micro', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize('size', [(224, 224), (256, 320), (97, 131)])
def test_transnext_any_size(size, monkeypatch):
    """The official model runs only at the square size it was built for; here every size runs, forward
    and backward, and the fast and reference neighborhood backends agree (1024: test_robustness)."""
    zoo = randomize_(timm.create_model('mz_transnext_micro')).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        a = zoo(x)
    assert a.shape == (1, 1000) and torch.isfinite(a).all()
    if size[0] <= 320:
        monkeypatch.setenv('MIXZOO_BACKEND', 'neighborhood:reference')
        with torch.no_grad():
            b = zoo(x)
        monkeypatch.delenv('MIXZOO_BACKEND')
        assert rel_err(a, b) < 1e-5
        zoo.train()
        zoo(x).square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in zoo.parameters())
