"""Robustness of every family, generated from the model registry: input sizes, dtypes and layouts,
torch.compile / torch.export, and clear errors for bad input. The smallest variant of each family
runs in every CI pass; the other fully tested variants run under the `slow` marker (also in CI).
Build-only variants (the largest) are out of scope here: too large for a 2-core CI machine."""
import copy
import pickle

import pytest
import timm
import torch

import mixzoo
from mixzoo import MODELS
from helpers import randomize_, rel_err

# bf16 autocast vs fp32 (max |diff| / max |logit|): no worse than 1.5x the reference model's own
# bf16 error on the same weights (each timm family's smallest variant), else BF16_TOL. With randomised
# weights both are large for MaxViT and HaloNet (measured 0.05-0.18 and 0.35-0.49, zoo and timm alike)
# and ~0.004 for PoolFormer.
BF16_TOL = 0.15


def _smallest():
    out = {}
    for n, m in MODELS.items():
        if not m.build_only and (m.family not in out or (m.params_m or 1e9) < (MODELS[out[m.family]].params_m or 1e9)):
            out[m.family] = n
    return out


SMALLEST = _smallest()
VARIANTS = [pytest.param(n, id=n, marks=[] if n in SMALLEST.values() else [pytest.mark.slow])
            for n, m in MODELS.items() if not m.build_only]
SMALL = [pytest.param(n, id=n) for n in SMALLEST.values()]


@pytest.fixture(scope='module')
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = randomize_(timm.create_model(name)).eval()
        return cache[name]
    return get


def test_every_family_has_a_smallest_variant():
    assert set(SMALLEST) == set(mixzoo.families())


def _size_params():
    """224, an odd size and the minimum for every variant; 1024 for each family's smallest variant only,
    cut to two blocks a stage (any-size handling is the family's code, shared by its variants and blocks;
    1024 on the large ones took 150 s, on the full smallest ones 15-46 s each)."""
    for p in VARIANTS:
        name = p.values[0]
        for hw, hid in (((224, 224), '224'), ((225, 317), '225x317'), ('min', 'min')):
            yield pytest.param(name, hw, id=f'{hid}-{name}', marks=p.marks)
        if name in SMALLEST.values():
            yield pytest.param(name, (1024, 1024), id=f'1024-{name}', marks=pytest.mark.slow)


@pytest.mark.parametrize('name,hw', list(_size_params()))
def test_sizes(name, hw, models):
    m = models(name) if hw != (1024, 1024) else _shallow_model(name)
    if hw == 'min':
        hw = m.min_input_size
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():     # one forward (forward_intermediates == forward_features: test_models)
        final, feats = m.forward_intermediates(x)
        logits = m.forward_head(final)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    for f, info in zip(feats, m.feature_info):
        r = info['reduction']
        assert f.shape[1] == info['num_chs']
        for got, full in zip(f.shape[2:], hw):
            assert full // r <= got <= -(-full // r), f'{name} {hw}: stage map {tuple(f.shape)} vs reduction {r}'
        assert torch.isfinite(f).all()


@pytest.mark.parametrize('name', VARIANTS)
def test_bf16_autocast_channels_last_determinism(name, models):
    m = models(name)
    smallest = name in SMALLEST.values()
    # where timm's model runs beside ours, its own size (its MaxViT-384 needs multiples of 384); the larger
    # variants, ours alone, at 160 (every path still runs: bf16 there costs 1-4 s a forward at 224)
    s = MODELS[name].img_size if smallest else 160
    g = torch.Generator().manual_seed(1)    # (the same input whether or not the model came from the cache)
    x = torch.randn(2 if smallest else 1, 3, s, s, generator=g)   # a batch of 2 once per family
    with torch.no_grad():
        ref = m(x)
        again = m(x) if smallest else None    # run-to-run: once per family
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = m(x)
        cl = m(x.contiguous(memory_format=torch.channels_last))
    assert again is None or torch.equal(ref, again), 'eval is not deterministic run to run'
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    kind, ref_name = MODELS[name].reference.split(':', 1)
    if kind != 'timm':
        assert rel_err(low.float(), ref) <= BF16_TOL
    elif smallest:
        # the reference's own bf16 error on the same weights sets the bound: with random weights it is
        # 0.1-0.5 on MaxViT and HaloNet variants (input-dependent; no flat bound fits), and its bf16
        # forward is this test's cost (HaloNet26t: 13 s against our 1.8 s on one AVX2 core; 150 s of worker
        # time on every variant), so it runs on each family's smallest; the others: autocast runs, finite
        r = timm.create_model(ref_name).eval()
        r.load_state_dict(m.state_dict())
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            r_low = r(x[:1])
        assert rel_err(low.float(), ref) <= max(1.5 * rel_err(r_low.float(), ref[:1]), 0.02)
    assert rel_err(cl, ref) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason='GPU dtypes need a CUDA device')
@pytest.mark.parametrize('name', SMALL)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_gpu_half_precision(name, dtype, models):
    m = models(name).cuda()
    x = torch.randn(2, 3, 224, 224, device='cuda')
    with torch.no_grad():
        ref = m(x)
        low = m.to(dtype)(x.to(dtype))
    m.float().cpu()
    assert torch.isfinite(low).all() and rel_err(low.float(), ref) <= BF16_TOL


def _shallow_model(name, **kwargs):
    """The variant with at most two blocks a stage, random weights, eval: every block kind, its first/other-
    block and alternating paths still run, in a third of the time (TransNeXt-micro's stage 3 has 15)."""
    arch = MODELS[name].arch
    depths = {k: tuple(min(d, 2) for d in arch[k]) for k in ('depths', 'depth') if k in arch}
    # per-block settings (DiNAT's dilations: a list per stage, an entry per block) cut alike
    per_block = {k: tuple(tuple(b[:2]) for b in v) for k, v in arch.items()
                 if k not in depths and isinstance(v, (tuple, list)) and all(isinstance(b, (tuple, list)) for b in v)}
    return randomize_(timm.create_model(name, **depths, **per_block, **kwargs)).eval()


@pytest.mark.parametrize('name', SMALL)
def test_factory_keywords_build_on_the_device_in_the_dtype(name):
    """timm's factory keywords (timm 1.0.31's models take them): parameters and buffers are created on
    ``device`` in ``dtype``. On the meta device nothing is allocated, so a tensor made on CPU and moved would
    show as a CPU tensor; features_only too. A float64 build computes what the float32 model cast to float64
    does (its position tables computed in float64 rather than cast: 1e-6)."""
    for kw in ({}, dict(features_only=True)):
        m = timm.create_model(name, device='meta', dtype=torch.bfloat16, **kw)
        tensors = [*m.parameters(), *m.buffers()]
        assert {t.device.type for t in tensors} == {'meta'}, [n for n, t in m.state_dict().items() if not t.is_meta]
        assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32                    # restored
    with pytest.raises(TypeError, match='floating point'):
        timm.create_model(name, device='meta', dtype=torch.int32)
    a = _shallow_model(name)
    b = _shallow_model(name, dtype=torch.float64)
    assert {p.dtype for p in b.parameters()} == {torch.float64}
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        y = b(x)
        assert y.dtype == torch.float64 and rel_err(y, a.double()(x)) < 1e-6


@pytest.mark.parametrize('name', SMALL)
def test_compile_matches_eager_without_graph_breaks(name):
    """fullgraph (a graph break is an error naming its reason): dynamo's trace under no_grad (the inference
    paths differ) and in training, each equal to eager. AOT tracing of the whole model (functionalization,
    our ops' fake kernels) is test_export's, inductor's code generation is checked per op in test_ops
    (40-130 s a model on a cold cache)."""
    m = _shallow_model(name)
    x = torch.randn(1, 3, 64, 96)
    torch._dynamo.reset()
    with torch.no_grad():
        assert rel_err(torch.compile(m, backend='eager', fullgraph=True)(x), m(x)) <= 1e-5
    torch._dynamo.reset()
    x = torch.randn(2, 3, 64, 96, requires_grad=True)     # (BatchNorm in training needs a batch above 1)
    assert rel_err(torch.compile(m.train(), backend='eager', fullgraph=True)(x), m(x)) <= 1e-5


@pytest.mark.parametrize('name', SMALL)
def test_export(name):
    m = _shallow_model(name)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():     # the inference paths, as deployed (AOT tracing with our ops' fake kernels)
        ep = torch.export.export(m, (x,), strict=False)
        assert rel_err(ep.module()(x), m(x)) <= 1e-5


def test_triton_op_is_a_custom_op_under_compile():
    """The Triton window kernels are torch custom ops: compile traces them with fullgraph=True."""
    from mixzoo import ops
    q, k, v = (torch.randn(2, 1, 9, 16) for _ in range(3))

    def f(q, k, v):
        return ops.window_attention(q, k, v, backend='triton')
    if torch.cuda.is_available():
        q, k, v = q.cuda(), k.cuda(), v.cuda()
    out = torch.compile(f, backend='aot_eager', fullgraph=True)(q, k, v)
    assert rel_err(out, ops.window_attention(q, k, v, backend='reference')) < 1e-5
    assert hasattr(torch.ops.mixzoo, 'window_attention_fwd')

    q, k, v = torch.randn(1, 2, 8, 6, 6), torch.randn(1, 2, 8, 6, 6), torch.randn(1, 2, 8, 6, 6)
    rel = torch.randn(11, 8) * 0.3

    def g(q, k, v):
        return ops.halo_attention(q, k, v, 4, 1, rel, rel, backend='triton')
    out = torch.compile(g, backend='aot_eager', fullgraph=True)(q, k, v)
    assert rel_err(out, ops.halo_attention(q, k, v, 4, 1, rel, rel, backend='reference')) < 1e-5
    assert hasattr(torch.ops.mixzoo, 'halo_attention_fwd')


# ---- bad input: a clear error naming the problem ------------------------------------------------

@pytest.mark.parametrize('name', SMALL)
def test_bad_inputs_are_named(name, models):
    m = models(name)
    cases = [(torch.randn(1, 4, 64, 64), ValueError, 'expected 3 input channels, got 4'),
             (torch.randn(3, 64, 64), ValueError, r'expected a 4-D \(B, C, H, W\) image batch'),
             (torch.randn(1, 3, 16, 64), ValueError, 'input 16x64 is below the minimum size 32x32'),
             (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, 'expected a floating point input')]
    for x, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            m(x)
        with pytest.raises(exc, match=msg):
            m.forward_intermediates(x)


@pytest.mark.parametrize('name', SMALL)
def test_training_after_inference_mode(name):
    """Evaluate under torch.inference_mode, then train at the same size: nothing the first call cached (border
    counts, geometry tables) may be an inference tensor, which a training step cannot save for backward."""
    m = _shallow_model(name)
    x = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        m(x)
    m.train()
    m(x).float().sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize('bf16', [False, True], ids=['fp32', 'bf16-autocast'])
@pytest.mark.parametrize('name', SMALL)
def test_nan_propagates_without_crash(name, models, bf16):
    """(Also through the fused oneDNN paths: the GEMM / conv post-ops must not turn NaN into a number.)"""
    x = torch.randn(1, 3, 64, 64)
    x[0, :, 10, 10] = float('nan')
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16, enabled=bf16):
        out = models(name)(x)
    assert torch.isnan(out).any()


# the ops whose inputs say which matrix units a forward uses (GEMMs, convolutions, attention)
_GEMM_OPS = {'mm', 'bmm', 'addmm', 'baddbmm', 'matmul', 'einsum', 'linear', 'conv1d', 'conv2d', 'convolution',
             '_convolution_pointwise', 'scaled_dot_product_attention', '_scaled_dot_product_flash_attention_for_cpu'}


@pytest.mark.parametrize('mode', ['autocast', 'bf16-weights'])
@pytest.mark.parametrize('name', SMALL)
def test_bf16_runs_every_product_in_bf16(name, models, mode):
    """In CPU inference under autocast to bfloat16, and of a model cast to bfloat16, every product of the forward
    takes bf16 inputs: no op path upcasts to fp32 in its hot loop (on CPUs with AVX512-BF16 / AMX the products run
    on the bf16 units). (Under autocast an upcast is undone by autocast itself; a bf16 model shows it.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split('.')[0] in _GEMM_OPS:
                self.seen.append((func.__name__, [a.dtype for a in args[:2] if isinstance(a, torch.Tensor)]))
            return func(*args, **(kwargs or {}))

    log = Products()
    m, x = models(name), torch.randn(1, 3, 96, 96)
    if mode == 'bf16-weights':
        m, x = copy.deepcopy(m).bfloat16(), x.bfloat16()
    with torch.inference_mode(), torch.autocast('cpu', torch.bfloat16, enabled=mode == 'autocast'), log:
        m(x)
    assert log.seen
    assert [s for s in log.seen if any(d != torch.bfloat16 for d in s[1])] == []


def test_forced_backend_that_cannot_run_lists_reasons(monkeypatch):
    m = timm.create_model('mz_maxvit_tiny_tf_224').eval().double()
    monkeypatch.setenv('MIXZOO_BACKEND', 'window:triton')
    with pytest.raises(RuntimeError, match=r"window: backend 'triton' \(from MIXZOO_BACKEND=\) cannot run this call"
                                           r".*dtype float64 not supported"):
        m(torch.randn(1, 3, 64, 64, dtype=torch.float64))


class _NotAStateDict:
    pass


@pytest.fixture(scope='module')
def s12_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('ck') / 'poolformer_s12.pth'
    torch.save(timm.create_model('poolformer_s12').state_dict(), path)
    return path


def _load(name, path):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_checkpoint_of_another_variant_or_family(s12_file):
    with pytest.raises(ValueError, match=r'does not match mz_poolformer_s24.*120 missing key\(s\): '
                                         r'stages\.0\.blocks\.2\.'):
        _load('mz_poolformer_s24', s12_file)
    with pytest.raises(ValueError, match=r'does not match mz_maxvit_tiny_tf_224.*missing key\(s\).*'
                                         r'unexpected key\(s\): stem\.conv\.weight'):
        _load('mz_maxvit_tiny_tf_224', s12_file)
    sd = torch.load(s12_file, weights_only=True)
    sd['head.fc.weight'] = sd['head.fc.weight'][:, :100]
    with pytest.raises(ValueError, match=r'shape mismatch\(es\): head\.fc\.weight: checkpoint \(1000, 100\) '
                                         r'vs model \(1000, 512\)'):
        mixzoo.poolformer.checkpoint_filter_fn(sd, timm.create_model('mz_poolformer_s12'))


def test_truncated_corrupted_and_unsafe_files(s12_file, tmp_path):
    from mixzoo._weights import read_checkpoint
    data = s12_file.read_bytes()
    (tmp_path / 'trunc.pth').write_bytes(data[: len(data) // 2])
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint at all' * 10)
    (tmp_path / 'obj.pth').write_bytes(pickle.dumps({'model': _NotAStateDict()}))
    torch.save({'model': _NotAStateDict()}, tmp_path / 'obj_zip.pth')
    for f in ('trunc.pth', 'junk.pth', 'obj.pth'):   # obj.pth: a raw pickle, not torch.save's format
        with pytest.raises(ValueError, match=r'could not read checkpoint .*\(truncated or corrupted'):
            read_checkpoint(str(tmp_path / f))
        with pytest.raises(ValueError, match=r'could not read checkpoint .*\(truncated or corrupted') as e:
            _load('mz_poolformer_s12', tmp_path / f)     # pretrained=True reads through the same safe reader
        assert 'weights_only=False' not in str(e.value) and 'set to `False`' not in str(e.value)
    with pytest.raises(ValueError, match='refusing to load .*obj_zip.pth: it is not a plain state dict'):
        read_checkpoint(str(tmp_path / 'obj_zip.pth'))
    with pytest.raises(Exception, match='weights_only'):
        _load('mz_poolformer_s12', tmp_path / 'obj_zip.pth')
    with pytest.raises(FileNotFoundError, match=r'checkpoint file not found: .*missing\.pth \(no such file; give'):
        read_checkpoint(str(tmp_path / 'missing.pth'))
    with pytest.raises(FileNotFoundError, match=r'checkpoint file not found: .*missing\.pth \(no such file'):
        _load('mz_poolformer_s12', tmp_path / 'missing.pth')
    assert set(read_checkpoint(str(s12_file))) == set(timm.create_model('mz_poolformer_s12').state_dict())
