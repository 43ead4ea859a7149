#!/usr/bin/env python
"""Regenerate checkpoints/manifest.json from the model registry and timm's pretrained configs
(offline: timm ships the hub ids). sha256 values already recorded in the manifest are kept.

    python tools/manifest.py            # rewrite checkpoints/manifest.json
    python tools/manifest.py --check    # exit 1 if it is out of date
"""
import argparse
import json
import os
import sys

import timm  # noqa: E402
from timm.models import get_pretrained_cfg  # noqa: E402

from mixzoo import MODELS  # noqa: E402

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'checkpoints', 'manifest.json')
# the authors' own release files, for the families whose official layout the zoo converts
OFFICIAL = {
    'poolformer': 'https://github.com/sail-sg/poolformer/releases/download/v1.0/{ref}.pth.tar',
    'shvit': 'https://github.com/ysj9909/SHViT/releases/download/v1.0/{ref}.pth',
}


# families whose reference is the official repository: their release files (no timm pretrained cfg)
OFFICIAL_RELEASES = {
    'transnext': lambda v: dict(tag='in1k', file=f'transnext_{v}_224_1k.pth', sources=[{
        'url': f'https://huggingface.co/DaiShiResearch/transnext-{v}-224-1k/resolve/main/transnext_{v}_224_1k.pth',
        'layout': 'official', 'format': 'torch'}], resolution=224),
    # the OneDrive links of rayleizhu/BiFormer's README (models/biformer.py model_urls); the file name is the
    # one its loader saves them under ({'model': state_dict, ...})
    'biformer': lambda v: dict(tag='in1k', file=f'biformer_{v}_in1k.pth', sources=[{
        'url': _BIFORMER_URLS[v], 'layout': 'official', 'format': 'torch'}], resolution=224),
    # GitHub release v1.0 of ChuanyangZheng/L2ViT: {'model', 'model_ema', 'optimizer', ...}; the zoo loads 'model'
    # (as the official evaluation does) unless checkpoint_entry='model_ema' is passed
    'l2vit': lambda v: dict(tag='in1k', file=f'L2ViT-{v.capitalize()}-checkpoint-best-ema.pth', sources=[{
        'url': f'{_L2VIT_RELEASE}/L2ViT-{v.capitalize()}-checkpoint-best-ema.pth', 'layout': 'official',
        'format': 'torch'}], resolution=224),
}
_L2VIT_RELEASE = 'https://github.com/ChuanyangZheng/L2ViT/releases/download/v1.0'
_BIFORMER_URLS = {
    'tiny': 'https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHEOoGkgwgQzEDlM/root/content',
    'small': 'https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content',
    'base': 'https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHI_XPhoadjaNxtO/root/content',
}


def build(old):
    out = {'schema': 1, 'cache_env': 'MIXZOO_WEIGHTS', 'models': {}}
    for name, info in MODELS.items():
        kind, ref = info.reference.split(':', 1)
        known = {c['tag']: c for c in old.get('models', {}).get(name, {}).get('checkpoints', [])}
        entries = []
        for full in timm.list_pretrained(ref + '.*') if kind == 'timm' else []:
            arch, tag = full.split('.', 1)
            if arch != ref:
                continue
            cfg = get_pretrained_cfg(full).to_dict()
            sources = [{'url': f"https://huggingface.co/{cfg['hf_hub_id']}/resolve/main/model.safetensors",
                        'layout': 'timm', 'format': 'safetensors'}]
            if cfg.get('url'):     # the weights' original release file (for HaloNets, timm's own)
                sources.append({'url': cfg['url'], 'layout': 'timm', 'format': 'torch'})
            if info.family in OFFICIAL and tag.endswith('in1k'):
                sources.append({'url': OFFICIAL[info.family].format(ref=ref), 'layout': 'official', 'format': 'torch'})
            res = cfg['input_size'][-1]
            entries.append({
                'tag': tag, 'file': f'{ref}.{tag}.safetensors', 'sources': sources,
                'sha256': known.get(tag, {}).get('sha256'), 'num_classes': cfg.get('num_classes', 1000),
                'resolution': res, 'crop_pct': cfg.get('crop_pct'),
                'top1': info.top1 if tag.endswith('in1k') and 'in21k' not in tag and res == info.img_size else None})
        if kind == 'official' and info.family in OFFICIAL_RELEASES:
            rel = OFFICIAL_RELEASES[info.family](name.split('_', 2)[2])
            entries.append({**rel, 'sha256': known.get(rel['tag'], {}).get('sha256'), 'num_classes': 1000,
                            'crop_pct': get_pretrained_cfg(name).crop_pct, 'top1': info.top1})
        out['models'][name] = {'family': info.family, 'reference': info.reference, 'checkpoints': entries}
        if not entries:
            out['models'][name]['note'] = 'no released weights (build-only / untrained in the reference)'
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--check', action='store_true')
    args = p.parse_args(argv)
    old = json.load(open(PATH)) if os.path.exists(PATH) else {}
    new = build(old)
    if args.check:
        if new != old:
            print('checkpoints/manifest.json is out of date: run python tools/manifest.py', file=sys.stderr)
            return 1
        return 0
    with open(PATH, 'w') as f:
        json.dump(new, f, indent=1)
        f.write('\n')
    print(f'{PATH}: {len(new["models"])} models, {sum(len(m["checkpoints"]) for m in new["models"].values())} '
          f'checkpoints')
    return 0


if __name__ == '__main__':
    sys.exit(main())
