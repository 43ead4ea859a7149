"""Write configs/mmdet/*.py, configs/mmseg/*.py and configs/README.md from one table of recipes.

    python tools/gen_configs.py            # (re)write the files
    python tools/gen_configs.py --check    # exit 1 if the committed files differ (a test runs this)

Each config inherits mmdet's / mmseg's own bases (``mmdet::`` / ``mmseg::``) and changes only the
backbone, the neck/head input channels and strides, and the optimizer of the family's recipe.
Channels and strides are read from the zoo's backbone adapter, not typed in.
"""
import argparse
import functools
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Per family: variants (zoo name, short name), adapter options, and the optimizer recipe of the
# official dense-task configs where a repository reports results (else the recipe named in `note`).
SWIN_NO_DECAY = {'norm': dict(decay_mult=0.0), 'rel_pos': dict(decay_mult=0.0),
                 'relative_position': dict(decay_mult=0.0)}
# Swin's dense-task settings (AdamW, no decay on norms / relative-position tables, per-output LayerNorm)
SWIN_RECIPE = dict(
    backbone=dict(out_norm='ln'),
    drop_path=dict(det=(0.2, 0.3), seg=(0.3, 0.3)),
    det=dict(optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05), no_decay=SWIN_NO_DECAY),
    seg=dict(optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01), no_decay=SWIN_NO_DECAY,
             poly_power=1.0, warmup=1500))
RECIPES = {
    'poolformer': dict(
        variants=[('mz_poolformer_s12', 'poolformer-s12'), ('mz_poolformer_s24', 'poolformer-s24')],
        backbone=dict(out_norm='gn'),   # the official dense backbones add GroupNorm(1) per output
        det=dict(optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4)),
        seg=dict(optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4), poly_power=0.9, warmup=0),
        note='sail-sg/poolformer dense configs (AdamW 2e-4, wd 1e-4; Semantic FPN there: 40k iters x 32 '
             'images = 80k x 16 here)'),
    'davit': dict(
        variants=[('mz_davit_tiny', 'davit-tiny'), ('mz_davit_small', 'davit-small')],
        **SWIN_RECIPE,
        note="Swin's dense-task recipe, which the DaViT paper follows"),
    'maxvit': dict(
        variants=[('mz_maxvit_tiny_tf_224', 'maxvit-tiny'), ('mz_maxvit_small_tf_224', 'maxvit-small')],
        **SWIN_RECIPE,
        note="no official dense configs: Swin's recipe"),
    'transnext': {
        **SWIN_RECIPE,
        'variants': [('mz_transnext_tiny', 'transnext-tiny'), ('mz_transnext_small', 'transnext-small')],
        'backbone': dict(),      # its stages already end in a LayerNorm (the official dense outputs)
        'note': "Swin's recipe (the official TransNeXt dense configs could not be read here)"},
    'l2vit': dict(
        variants=[('mz_l2vit_tiny', 'l2vit-tiny'), ('mz_l2vit_small', 'l2vit-small')],
        backbone=dict(out_norm='ln'),   # the official dense backbone adds a LayerNorm per output (norm{i})
        drop_path=dict(det=(0.1, 0.1), seg=(0.3, 0.3)),
        det=dict(optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)),
        seg=dict(optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01), poly_power=1.0,
                 warmup=1500),
        note='ChuanyangZheng/L2ViT dense configs (AdamW, no decay exemptions; its multi-scale det train '
             "pipeline not copied); Semantic FPN, which it has no config for: UperNet's optimizer"),
    'biformer': dict(
        variants=[('mz_biformer_tiny', 'biformer-tiny'), ('mz_biformer_small', 'biformer-small')],
        backbone=dict(out_norm='ln'),   # the official dense backbone adds a LayerNorm2d per output (extra_norms)
        # per method: the official BiFormer-S configs (no official BiFormer-T ones: T takes S's)
        drop_path={'det': (0.2, 0.2), 'upernet': (0.3, 0.3), 'fpn': (0.15, 0.15)},
        det=dict(optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05), no_decay=SWIN_NO_DECAY,
                 backbone=dict(n_win=16)),
        seg=dict(optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01), no_decay=SWIN_NO_DECAY,
                 poly_power=1.0, warmup=1500, backbone=dict(n_win=8)),
        methods={'retinanet': dict(optimizer=dict(type='AdamW', lr=1e-4, weight_decay=1e-4), no_decay=None),
                 'fpn': dict(optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4), no_decay=None,
                             poly_power=0.9, warmup=0)},
        note='rayleizhu/BiFormer dense configs of BiFormer-S (auto_pad, region grid n_win 16 for detection, 8 for '
             'segmentation; Mask R-CNN AdamW 1e-4 wd 0.05 no decay on norms, RetinaNet AdamW 1e-4 wd 1e-4, UperNet '
             'AdamW 6e-5 wd 0.01 poly 1.0 warmup 1500, S-FPN AdamW 2e-4 wd 1e-4 but poly 0.9 here where the '
             'official one is cosine with warmup; their fp16 not set)'),
    'halonet': dict(
        variants=[('mz_halonet26t', 'halonet26t'), ('mz_halonet50ts', 'halonet50ts')],
        backbone=dict(frozen_stages=1),
        det=dict(norm_eval=True),       # mmdet's ResNet recipe (its base configs' SGD)
        seg=dict(),                     # mmseg's ResNet recipe (its base schedule's SGD)
        note="no official dense configs: mmdet's / mmseg's ResNet recipe (BN backbone)"),
    'shvit': dict(
        variants=[('mz_shvit_s1', 'shvit-s1'), ('mz_shvit_s4', 'shvit-s4')],
        backbone=dict(),
        det=dict(optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4), norm_eval=True),
        seg=dict(optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4), poly_power=0.9, warmup=0),
        note='no dense config in this repo: AdamW 2e-4 as PoolFormer; outputs at strides 16-64, so '
             'anchors/RoI strides follow'),
}

# Published results (paper tables; COCO val box AP / mask AP, ADE20K val single-scale mIoU).
PUBLISHED = {
    ('poolformer-s12', 'retinanet'): '36.2 AP', ('poolformer-s24', 'retinanet'): '38.9 AP',
    ('poolformer-s12', 'mask-rcnn'): '37.3 AP / 34.6 mask AP', ('poolformer-s24', 'mask-rcnn'): '40.1 / 37.0',
    ('poolformer-s12', 'fpn'): '37.2 mIoU', ('poolformer-s24', 'fpn'): '40.3 mIoU',
    ('davit-tiny', 'retinanet'): '44.0 AP', ('davit-small', 'retinanet'): '46.0 AP',
    ('davit-tiny', 'mask-rcnn'): '45.0 / 41.1', ('davit-small', 'mask-rcnn'): '47.7 / 42.9',
    ('davit-tiny', 'upernet'): '46.3 mIoU', ('davit-small', 'upernet'): '48.8 mIoU',
    # ../shared/REFERENCE.md (the official repository's README)
    ('transnext-tiny', 'mask-rcnn'): '49.9 AP', ('transnext-small', 'mask-rcnn'): '51.1 AP',
    ('transnext-tiny', 'upernet'): '51.1 mIoU', ('transnext-small', 'upernet'): '52.2 mIoU',
    # ../shared/REFERENCE.md; S-FPN from the official semantic_segmentation/README.md (BiFormer-S only)
    ('biformer-small', 'mask-rcnn'): '47.8 / 43.2', ('biformer-small', 'retinanet'): '45.9 AP',
    ('biformer-small', 'upernet'): '49.8 mIoU', ('biformer-small', 'fpn'): '48.9 mIoU',
}

HEADER = '# Generated by tools/gen_configs.py from its recipe table; edit that, not this file.\n'
IMPORTS = "custom_imports = dict(imports=['mixzoo.mm'], allow_failed_imports=False)\n"


def _with_all_stages(recipes):
    """Every stage of the family (its record's stage count) as an output where the adapter's default
    (0, 1, 2, 3) is not all of them."""
    import mixzoo
    for fam, r in recipes.items():
        n = mixzoo.FAMILIES[fam].num_stages
        if n != 4:
            r['backbone'].setdefault('out_indices', tuple(range(n)))
    return recipes


RECIPES = _with_all_stages(RECIPES)


def fmt(v) -> str:
    return repr(v)


def backbone_info(name, opts):
    return _backbone_info(name, tuple(opts.get('out_indices', (0, 1, 2, 3))))


@functools.lru_cache(maxsize=None)
def _backbone_info(name, out_indices):
    """The adapter's output channels and strides, from a build on the meta device (no weights, no compute)."""
    import torch
    from mixzoo.mm import MixZooBackbone
    with torch.device('meta'):
        b = MixZooBackbone(name, out_indices=out_indices)
    return b.out_channels, b.out_strides


def drop_path_of(recipe, task_key, method, i):
    """The variant's drop path rate: per method where the recipe gives one, else per task."""
    dp = recipe.get('drop_path', {})
    return dp.get(method, dp.get(task_key, (None, None)))[i]


def backbone_block(name, opts, drop_path, extra=None):
    args = dict(type='MixZooBackbone', model_name=name,
                pretrained='zoo')   # the release checkpoint from $MIXZOO_WEIGHTS (see checkpoints/README.md)
    args.update({k: v for k, v in opts.items()})
    if drop_path is not None:
        args['drop_path_rate'] = drop_path
    args.update(extra or {})
    body = ', '.join(f'{k}={fmt(v)}' for k, v in args.items())
    return f'dict(_delete_=True, {body})'


def optim_base(task, recipe, method, files):
    """The method's base with the family's optimizer (and for mmseg its LR schedule), named after its
    settings so families with the same recipe share it; the plain method base when the mm base
    schedule's optimizer is kept. (A child of the method base, not a sibling: mmengine refuses the
    same key in two sibling bases.)"""
    parent = method_base(method, files)
    r = {**recipe['det' if task == 'mmdet' else 'seg'], **recipe.get('methods', {}).get(method, {})}
    if 'optimizer' not in r:
        return parent
    o = r['optimizer']
    name = f"adamw_lr{o['lr']:g}_wd{o['weight_decay']:g}" + ('_nodecay-norms' if r.get('no_decay') else '')
    pw = f",\n    paramwise_cfg=dict(custom_keys={fmt(r['no_decay'])})" if r.get('no_decay') else ''
    lines = [HEADER, f"_base_ = ['./{Path(parent).name}']",
             f"optim_wrapper = dict(\n    _delete_=True, type='OptimWrapper', optimizer={fmt(o)}, clip_grad=None{pw})"]
    if task == 'mmseg':
        iters = 160000 if method == 'upernet' else 80000
        warm = r.get('warmup', 0)
        name += f"_poly{r['poly_power']:g}" + (f'_warmup{warm}' if warm else '')
        lines.append('param_scheduler = [')
        if warm:
            lines.append(f"    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end={warm}),")
        lines += [f"    dict(type='PolyLR', eta_min=0.0, power={r['poly_power']}, begin={warm}, end={iters}, "
                  f"by_epoch=False),", ']']
    rel = f"{parent[:-len('.py')]}_{name}.py"
    files[f'configs/{task}/{rel[2:]}'] = '\n'.join(lines) + '\n'
    return rel


MM_BASES = {
    'mask-rcnn': ('mmdet', ['models/mask-rcnn_r50_fpn', 'datasets/coco_instance', 'schedules/schedule_1x',
                            'default_runtime'], 'fpn_1x_coco'),
    'retinanet': ('mmdet', ['models/retinanet_r50_fpn', 'datasets/coco_detection', 'schedules/schedule_1x',
                            'default_runtime'], 'fpn_1x_coco'),
    'upernet': ('mmseg', ['models/upernet_r50', 'datasets/ade20k', 'schedules/schedule_160k', 'default_runtime'],
                '512x512-160k_ade20k'),
    'fpn': ('mmseg', ['models/fpn_r50', 'datasets/ade20k', 'schedules/schedule_80k', 'default_runtime'],
            '512x512-80k_ade20k'),
}


def method_base(method, files):
    """mmdet's / mmseg's own bases for the method (package scope), and the zoo's custom import."""
    task, bases, sched = MM_BASES[method]
    lines = [HEADER, '_base_ = ['] + [f"    '{task}::_base_/{b}.py'," for b in bases] + [']', IMPORTS.rstrip()]
    if task == 'mmseg':
        heads = 'decode_head=dict(num_classes=150)' + (
            ', auxiliary_head=dict(num_classes=150)' if method == 'upernet' else '')
        lines += ['crop_size = (512, 512)',
                  "# (pretrained=None: mmseg's EncoderDecoder would hand the ResNet base's URL to the backbone)",
                  'model = dict(data_preprocessor=dict(size=crop_size), pretrained=None,',
                  f'             {heads})']
    rel = f'configs/{task}/_base_/{method}_{sched}.py'
    files[rel] = '\n'.join(lines) + '\n'
    return f'./_base_/{method}_{sched}.py'


def header(task, method, recipe, files):
    return [HEADER, f"_base_ = ['{optim_base(task, recipe, method, files)}']"]


def det_config(method, name, short, recipe, i, files):
    chans, strides = backbone_info(name, recipe['backbone'])
    dp = drop_path_of(recipe, 'det', method, i)
    extra = {'norm_eval': True} if recipe['det'].get('norm_eval') else {}
    extra.update(recipe['det'].get('backbone', {}))
    lines = header('mmdet', method, recipe, files)
    standard = strides[-3:] == [8, 16, 32] and len(strides) == 4
    if method == 'retinanet':
        if standard:
            neck = f'dict(in_channels={chans})'
            head = ''
        else:   # use every output, extra levels on top
            neck = f"dict(in_channels={chans}, start_level=0)"
            lv = strides + [strides[-1] * 2 ** j for j in range(1, 6 - len(strides))]
            head = f",\n    bbox_head=dict(anchor_generator=dict(strides={lv[:5]}))"
    else:
        neck = f'dict(in_channels={chans})'
        lv = strides + [strides[-1] * 2 ** j for j in range(1, 6 - len(strides))]
        head = ''
        if lv[:5] != [4, 8, 16, 32, 64]:
            head = (f",\n    rpn_head=dict(anchor_generator=dict(strides={lv[:5]})),\n"
                    f"    roi_head=dict(bbox_roi_extractor=dict(featmap_strides={lv[:4]}),\n"
                    f"                  mask_roi_extractor=dict(featmap_strides={lv[:4]}))")
    lines.append('model = dict(')
    lines.append(f"    backbone={backbone_block(name, recipe['backbone'], dp, extra)},")
    lines.append(f'    neck={neck}{head})')
    return '\n'.join(lines) + '\n'


def seg_config(method, name, short, recipe, i, files):
    chans, strides = backbone_info(name, recipe['backbone'])
    dp = drop_path_of(recipe, 'seg', method, i)
    n = len(chans)
    lines = header('mmseg', method, recipe, files) + [
        'model = dict(', f"    backbone={backbone_block(name, recipe['backbone'], dp, recipe['seg'].get('backbone'))},"]
    if method == 'upernet':
        lines += [f'    decode_head=dict(in_channels={chans}, in_index={list(range(n))}),',
                  f'    auxiliary_head=dict(in_channels={chans[-2]}, in_index={n - 2}))']
    else:
        lines += [f'    neck=dict(in_channels={chans}, num_outs={n}),',
                  f'    decode_head=dict(in_channels={[256] * n}, in_index={list(range(n))}, '
                  f'feature_strides={strides}))']
    return '\n'.join(lines) + '\n'


METHODS = [('mmdet', 'mask-rcnn', '1x_coco', det_config), ('mmdet', 'retinanet', '1x_coco', det_config),
           ('mmseg', 'upernet', '512x512-160k_ade20k', seg_config), ('mmseg', 'fpn', '512x512-80k_ade20k', seg_config)]


def variant_config(task, method, first_rel, name, recipe, i):
    """A further variant of a family: inherits the family's first config (mmdet's own style, as its
    swin-s configs inherit swin-t) and changes the model, its drop path and the channels."""
    chans, strides = backbone_info(name, recipe['backbone'])
    key = 'det' if task == 'mmdet' else 'seg'
    dp = drop_path_of(recipe, key, method, i)
    bb = f"model_name={name!r}" + (f', drop_path_rate={dp}' if dp is not None else '')
    lines = [HEADER, f"_base_ = ['./{Path(first_rel).name}']", 'model = dict(', f'    backbone=dict({bb}),']
    if task == 'mmdet' or method == 'fpn':
        lines.append(f'    neck=dict(in_channels={chans}))')
    else:
        lines += [f'    decode_head=dict(in_channels={chans}),',
                  f'    auxiliary_head=dict(in_channels={chans[-2]}))']
    return '\n'.join(lines) + '\n'


def generate():
    files, rows = {}, []
    for family, recipe in RECIPES.items():
        for i, (name, short) in enumerate(recipe['variants']):
            for task, method, sched, fn in METHODS:
                suffix = 'fpn_' if task == 'mmdet' else ''
                rel = f'configs/{task}/{method}_{short}_{suffix}{sched}.py'
                if i == 0:
                    files[rel] = fn(method, name, short, recipe, i, files)
                else:
                    first = f"configs/{task}/{method}_{recipe['variants'][0][1]}_{suffix}{sched}.py"
                    files[rel] = variant_config(task, method, first, name, recipe, i)
                rows.append(f"| `{rel[len('configs/'):]}` | `{name}` | "
                            f"{PUBLISHED.get((short, method), '—')} | {recipe['note']} |")
    readme = [
        '# Detection and segmentation configs', '',
        'Generated by `tools/gen_configs.py` (one recipe table; `--check` is run by the tests). Each file',
        "inherits mmdet's / mmseg's own base configs (`mmdet::` / `mmseg::`) and swaps in the zoo backbone",
        '(`backbones/mm.py`, `MixZooBackbone`) with the neck/head channels and strides it reports.', '',
        "`pretrained='zoo'` loads the family's released ImageNet checkpoint from `$MIXZOO_WEIGHTS` (see",
        '`checkpoints/README.md`; nothing is downloaded) and fails with the file to get if it is absent; set',
        'it to a checkpoint path in any layout the family accepts, or to None to train from scratch.', '',
        'Train / test like mmdet\'s and mmseg\'s own tools (data under `data/coco`, `data/ade/ADEChallengeData2016`,',
        'or `--cfg-options train_dataloader.dataset.data_root=...`):', '',
        '```', 'python tools/train.py configs/mmdet/mask-rcnn_davit-tiny_fpn_1x_coco.py',
        'python tools/test.py configs/mmseg/upernet_davit-tiny_512x512-160k_ade20k.py work_dirs/.../iter_160000.pth',
        '```', '',
        "Published = what the family's authors report for that model and schedule (COCO val box AP / mask AP,",
        'ADE20K val single-scale mIoU): TransNeXt from ../shared/REFERENCE.md (its README); BiFormer-S from the',
        "official repository's detection / segmentation READMEs (no BiFormer-T dense results); PoolFormer and",
        "DaViT from their papers' COCO / ADE20K tables, written down, like the recipe sources, without access",
        'to the papers or repositories in this workplace: check them before quoting. "—": no figure listed,',
        'either because no official number exists for that pair (MaxViT and HaloNet have no official',
        'dense-task results; PoolFormer reports Semantic FPN, not UperNet; DaViT the reverse) or because it',
        'could not be checked here (SHViT reports S4 detection results; TransNeXt RetinaNet). These are',
        'targets with the real data and 8-GPU batch sizes; the CI only smoke-trains on tiny generated sets.', '',
        '| config | backbone | published | recipe |', '|---|---|---|---|'] + rows
    files['configs/README.md'] = '\n'.join(readme) + '\n'
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--check', action='store_true', help='fail if the committed configs are not up to date')
    args = ap.parse_args(argv)
    files = generate()
    old = {os.path.relpath(p, ROOT) for d in ('mmdet', 'mmseg', 'mmdet/_base_', 'mmseg/_base_')
           for p in (ROOT / 'configs' / d).glob('*.py')}
    extra = sorted(old - set(files))
    stale = [rel for rel, text in files.items()
             if not (ROOT / rel).is_file() or (ROOT / rel).read_text(encoding='utf-8') != text]
    if args.check:
        for rel in stale:
            print(f'out of date: {rel} (run python tools/gen_configs.py)')
        for rel in extra:
            print(f'not generated: {rel} (add it to the recipe table or remove it)')
        return 1 if stale or extra else 0
    for rel in stale:
        os.makedirs((ROOT / rel).parent, exist_ok=True)
        (ROOT / rel).write_text(files[rel], encoding='utf-8')
    print(f'{len(files)} files, {len(stale)} written')
    return 0


if __name__ == '__main__':
    sys.exit(main())
