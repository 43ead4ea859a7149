"""mmdet / mmseg integration: the backbone adapter, every shipped config, and CPU smoke training
(train, checkpoint, resume, evaluate) on tiny generated datasets."""
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import MISSING_DEP

ROOT = Path(__file__).resolve().parent.parent
for _pkg in ('mmengine', 'mmcv', 'mmdet', 'mmseg'):
    pytest.importorskip(_pkg, reason=f'{MISSING_DEP}: {_pkg} (install the mm stack: bash tools/install_mm.sh)')

import timm  # noqa: E402

import mixzoo  # noqa: E402
from mixzoo.mm import MixZooBackbone  # noqa: E402
from helpers import randomize_  # noqa: E402
from mm_data import COCO_CLASSES, make_ade, make_coco  # noqa: E402

pytestmark = pytest.mark.mm
CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / 'configs' / 'mm*' / '*.py')))
ONE_PER_FAMILY = {m.family: n for n, m in reversed(list(mixzoo.MODELS.items())) if not m.build_only}


@pytest.fixture(scope='module', autouse=True)
def _metafiles_read_once():
    """mmengine resolves each 'mmdet::' / 'mmseg::' base by first parsing every metafile of the package
    (~100 yaml files, 2.2 s a config here, 140 of the 186 s the config builds took): read each file once
    per process. (What it returns is only read.)"""
    import functools

    import mmengine.config.utils as cfg_utils
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cfg_utils, 'load', functools.lru_cache(maxsize=None)(cfg_utils.load))
        yield


def _stages(name):
    return tuple(range(mixzoo.FAMILIES[mixzoo.MODELS[name].family].num_stages))


# --- the adapter -----------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(ONE_PER_FAMILY.values()))
def test_backbone_outputs_match_the_models_features(name):
    """Any size (not a multiple of 32): the maps are the model's stage outputs, with the channels
    and strides the adapter lists for the neck."""
    ref = randomize_(timm.create_model(name)).eval()
    b = MixZooBackbone(name, out_indices=_stages(name)).eval()
    b.model.load_state_dict({k: v for k, v in ref.state_dict().items() if k in b.model.state_dict()})
    x = torch.randn(2, 3, 100, 150)
    with torch.no_grad():
        out = b(x)
        want = ref.forward_intermediates(x, indices=[i + int(ref.stem_is_feature) for i in _stages(name)],
                                         intermediates_only=True)
    assert len(out) == len(b.out_channels) == len(b.out_strides)
    for o, w, c, s in zip(out, want, b.out_channels, b.out_strides):
        assert o.shape[1] == c and abs(o.shape[2] - 100 / s) < 1 and abs(o.shape[3] - 150 / s) < 1
        assert o.is_contiguous()
        torch.testing.assert_close(o, w, rtol=0, atol=0)


def test_backbone_detection_size():
    b = MixZooBackbone('mz_poolformer_s12').eval()
    with torch.no_grad():
        out = b(torch.randn(1, 3, 800, 1344))        # mmdet pads 800x1333 to a multiple of 32
    assert [tuple(o.shape[2:]) for o in out] == [(200, 336), (100, 168), (50, 84), (25, 42)]


def test_pretrained_any_layout_and_prefix(tmp_path):
    """pretrained= goes through the family's converter (official/timm layouts, 'model' wrapper);
    init_cfg with a prefix reads a detector's backbone; mismatches raise, absent 'zoo' says what to get."""
    ref = randomize_(timm.create_model('poolformer_s12'))
    path = tmp_path / 'timm_layout.pth'
    torch.save({'model': ref.state_dict()}, path)
    b = MixZooBackbone('mz_poolformer_s12', pretrained=str(path))
    b.init_weights()
    zoo = timm.create_model('mz_poolformer_s12', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in b.model.state_dict().items():
        torch.testing.assert_close(v, zoo.state_dict()[k], rtol=0, atol=0)
    # a detector checkpoint: backbone.* keys in the adapter's own layout
    det = tmp_path / 'det.pth'
    torch.save({'state_dict': {**{f'backbone.{k}': v for k, v in b.state_dict().items()},
                               'neck.w': torch.zeros(1)}}, det)
    c = MixZooBackbone('mz_poolformer_s12', init_cfg=dict(type='Pretrained', checkpoint=str(det), prefix='backbone.'))
    c.init_weights()
    for k, v in c.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)
    other = tmp_path / 'davit.pth'
    torch.save(timm.create_model('davit_tiny').state_dict(), other)
    with pytest.raises(ValueError, match='does not match'):
        MixZooBackbone('mz_poolformer_s12', pretrained=str(other)).init_weights()
    os.environ['MIXZOO_WEIGHTS'] = str(tmp_path / 'empty')
    try:
        with pytest.raises(FileNotFoundError, match='not found locally'):
            MixZooBackbone('mz_poolformer_s12', pretrained='zoo').init_weights()
    finally:
        del os.environ['MIXZOO_WEIGHTS']


def test_frozen_stages_norm_eval_and_checkpointing():
    b = MixZooBackbone('mz_halonet26t', frozen_stages=2, norm_eval=True)
    b.train()
    frozen = [b.model.stem, b.model.stages[0], b.model.stages[1]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in b.model.stages[2].parameters())
    assert all(not m.training for m in frozen)
    assert not any(m.training for m in b.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert b.model.stages[2].training        # only the norms of the trainable part stay in eval

    x = torch.randn(2, 3, 64, 96)
    a = MixZooBackbone('mz_davit_tiny', drop_path_rate=0.0)
    c = MixZooBackbone('mz_davit_tiny', drop_path_rate=0.0, with_cp=True)
    c.load_state_dict(a.state_dict())
    for m in (a, c):
        sum(o.square().mean() for o in m(x)).backward()
    for (k, p), q in zip(a.named_parameters(), c.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match='unknown model'):
        MixZooBackbone('resnet50')
    with pytest.raises(ValueError, match='out_indices'):
        MixZooBackbone('mz_shvit_s1', out_indices=(0, 1, 2, 3))
    with pytest.raises(ValueError, match='frozen_stages'):
        MixZooBackbone('mz_poolformer_s12', frozen_stages=7)


def test_registered_in_both_registries():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG
    assert DET.get('MixZooBackbone') is MixZooBackbone and SEG.get('MixZooBackbone') is MixZooBackbone


# --- configs ---------------------------------------------------------------------------------

def test_generated_files_are_up_to_date():
    """Configs, configs/README.md, checkpoints/manifest.json and the README's model table are what the family
    records generate (tools/generate.py --check; the configs need the mm stack, hence here)."""
    r = subprocess.run([sys.executable, 'tools/generate.py', '--check'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(CONFIGS) >= 4 * len(ONE_PER_FAMILY)
    readme = (ROOT / 'configs' / 'README.md').read_text()
    assert all(os.path.relpath(c, 'configs') in readme for c in CONFIGS)


def _build(cfg):
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.default_scope)
    registry = __import__(f'{cfg.default_scope}.registry', fromlist=['MODELS']).MODELS
    cfg.model.backbone.pretrained = None
    return registry.build(cfg.model)


@pytest.mark.parametrize('config', CONFIGS)
def test_config_builds_and_runs(config):
    """Each config parses (mmdet::/mmseg:: bases, custom_imports), its model builds with the zoo
    backbone and predicts on a small image whose sides are not multiples of 32."""
    from mmengine.config import Config
    cfg = Config.fromfile(str(ROOT / config))
    assert cfg.custom_imports['imports'] == ['mixzoo.mm']
    model = _build(cfg).eval()
    model.init_weights()
    h, w = 90, 150
    if cfg.default_scope == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
        meta = dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0))
    else:
        from mmseg.structures import SegDataSample as Sample
        meta = dict(img_shape=(h, w), ori_shape=(h, w))
        model.data_preprocessor.size = None       # (the config pads to the 512 crop when training)
    data = dict(inputs=[torch.randint(0, 255, (3, h, w), dtype=torch.uint8)], data_samples=[Sample(metainfo=meta)])
    with torch.no_grad():
        out = model.test_step(data)
    if cfg.default_scope == 'mmdet':
        assert out[0].pred_instances.bboxes.shape[-1] == 4
    else:
        assert out[0].pred_sem_seg.data.shape == (1, h, w)


# --- CPU smoke training ----------------------------------------------------------------------

DET_DATA = '''
model = dict()
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(
    metainfo=dict(classes=CLASSES), data_root=data_root, ann_file='annotations/instances_train.json',
    data_prefix=dict(img='train/'),
    pipeline=[dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True, with_mask={mask}),
              dict(type='Resize', scale=(128, 96), keep_ratio=True), dict(type='RandomFlip', prob=0.5),
              dict(type='PackDetInputs')]))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, dataset=dict(
    metainfo=dict(classes=CLASSES), data_root=data_root, ann_file='annotations/instances_val.json',
    data_prefix=dict(img='val/'),
    pipeline=[dict(type='LoadImageFromFile'), dict(type='Resize', scale=(128, 96), keep_ratio=True),
              dict(type='LoadAnnotations', with_bbox=True, with_mask={mask}),
              dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1, val_interval=1)
param_scheduler = []
default_hooks = dict(checkpoint=dict(interval=1), logger=dict(interval=1))
'''

SEG_DATA = '''
crop = (64, 64)
model = dict(data_preprocessor=dict(size=crop))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False, dataset=dict(
    data_root=data_root, data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
    pipeline=[dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
              dict(type='RandomResize', scale=(128, 64), ratio_range=(0.8, 1.2), keep_ratio=True),
              dict(type='RandomCrop', crop_size=crop, cat_max_ratio=0.75), dict(type='RandomFlip', prob=0.5),
              dict(type='PackSegInputs')]))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, dataset=dict(
    data_root=data_root, data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
    pipeline=[dict(type='LoadImageFromFile'), dict(type='Resize', scale=(128, 64), keep_ratio=True),
              dict(type='LoadAnnotations', reduce_zero_label=True), dict(type='PackSegInputs')]))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=2, val_interval=2)
param_scheduler = []
default_hooks = dict(checkpoint=dict(interval=2), logger=dict(interval=1))
'''


def _tool(name):
    """tools/<name>.py as a module (not via sys.path: 'test' would be the standard library's)."""
    import importlib.util
    sys.path.insert(0, str(ROOT / 'tools'))
    spec = importlib.util.spec_from_file_location(f'mixzoo_tools_{name}', ROOT / 'tools' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _release_checkpoint(tmp_path, name):
    """The timm reference model's random weights saved as a release file (timm layout, 'model' wrapper)."""
    ref_name = mixzoo.MODELS[name].reference.split(':', 1)[1]
    path = tmp_path / f'{ref_name}.pth'
    torch.save({'model': randomize_(timm.create_model(ref_name)).state_dict()}, path)
    return path


def _scalars(work_dir):
    import json
    logs = sorted(glob.glob(str(Path(work_dir) / '*' / 'vis_data' / 'scalars.json')))
    rows = [json.loads(line) for f in logs for line in open(f)]
    return [r for r in rows if 'loss' in r]


@pytest.mark.slow
@pytest.mark.parametrize('config,name,data', [
    ('configs/mmdet/mask-rcnn_poolformer-s12_fpn_1x_coco.py', 'mz_poolformer_s12', 'coco-mask'),
    ('configs/mmdet/retinanet_shvit-s1_fpn_1x_coco.py', 'mz_shvit_s1', 'coco'),
    ('configs/mmseg/upernet_davit-tiny_512x512-160k_ade20k.py', 'mz_davit_tiny', 'ade'),
])
def test_train_resume_evaluate(tmp_path, monkeypatch, config, name, data):
    """tools/train.py from the shipped config (data, length and proposal/RoI counts overridden the way a
    user would for a tiny set), from a release-layout checkpoint; checkpoints, resumes, then tools/test.py
    computes the metric."""
    mm_train, mm_test = _tool('train'), _tool('test')
    # mmengine yapf-formats the config text for each log, dump and checkpoint (15 times, 18 s of 100 for
    # Mask R-CNN here): the unformatted text is the same config, and the formatting is not ours to test
    monkeypatch.setattr('mmengine.config.config.FormatCode', lambda text, **kw: (text, False))
    if data.startswith('coco'):
        root = make_coco(tmp_path / 'data')
        body = DET_DATA.format(mask=data == 'coco-mask')
        # a few iterations leave every score under the 0.05 threshold; keep all boxes so COCO eval runs
        # (and 100-pixel images need tens of proposals / RoIs, not COCO's 2000 / 512: the RoI heads were
        # 60% of the Mask R-CNN run)
        test_cfg = ('dict(rpn=dict(nms_pre=200, max_per_img=50), rcnn=dict(score_thr=0.0, max_per_img=20))'
                    if data == 'coco-mask' else 'dict(score_thr=0.0)')
        n = len(COCO_CLASSES)      # the detector is sized for the dataset, as for any custom set
        body = f'CLASSES = {COCO_CLASSES!r}\n' + body + (
            f'model.update(roi_head=dict(bbox_head=dict(num_classes={n}), mask_head=dict(num_classes={n})), '
            'train_cfg=dict(rpn_proposal=dict(nms_pre=400, max_per_img=100), rcnn=dict(sampler=dict(num=64))))\n'
            if data == 'coco-mask' else f'model.update(bbox_head=dict(num_classes={n}))\n')
    else:
        root = make_ade(tmp_path / 'data')
        body, test_cfg = SEG_DATA, 'dict()'
    cfg = tmp_path / 'tiny.py'
    cfg.write_text(f"_base_ = ['{ROOT / config}']\ndata_root = '{root}/'\n"
                   + body + f"model.update(backbone=dict(pretrained='{_release_checkpoint(tmp_path, name)}'), "
                   f"test_cfg={test_cfg})\n"
                   # mmengine keeps one visualizer per name per process: a fresh one logs into this work dir
                   f"visualizer = dict(name='vis_{tmp_path.name}')\n")
    wd = tmp_path / 'work'
    mm_train.main([str(cfg), '--work-dir', str(wd)])
    first = _scalars(wd)
    assert first and all(torch.isfinite(torch.tensor(r['loss'])) for r in first)
    by_epoch = data.startswith('coco')
    ck = wd / ('epoch_1.pth' if by_epoch else 'iter_2.pth')
    assert ck.is_file() and torch.load(ck, map_location='cpu', weights_only=False)['state_dict']
    more = 'train_cfg.max_epochs=2' if by_epoch else 'train_cfg.max_iters=4'
    mm_train.main([str(cfg), '--work-dir', str(wd), '--resume', '--cfg-options', more])
    last = wd / ('epoch_2.pth' if by_epoch else 'iter_4.pth')
    meta = torch.load(last, map_location='cpu', weights_only=False)['meta']
    assert (meta['epoch'], meta['iter']) == ((2, 4) if by_epoch else (0, 4))   # continued, not restarted
    metrics = mm_test.main([str(cfg), str(last), '--work-dir', str(wd)])
    key = 'coco/bbox_mAP' if by_epoch else 'mIoU'
    assert key in metrics and 0.0 <= metrics[key] <= 100.0
    assert all(torch.isfinite(torch.tensor(r['loss'])) for r in _scalars(wd))
