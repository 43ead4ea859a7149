"""checkpoints/manifest.json, from the family records and timm's pretrained configs (offline: timm ships the
hub ids); written or checked by ``python tools/generate.py [--check]``.

Per model, its released checkpoints: for a timm reference, each of timm's pretrained tags (the file on the
Hugging Face hub, then the file's original URL where timm's cfg names one, then the authors' own release
file of the record's ``release`` for that tag); for an official reference, the record's ``release``.
"""
import json

import timm
from timm.models import get_pretrained_cfg

from mixzoo import MODELS


def _timm_entries(info):
    ref, out = info.reference_name, []
    for full in timm.list_pretrained(ref + '.*'):
        arch, tag = full.split('.', 1)
        if arch != ref:
            continue
        cfg = get_pretrained_cfg(full).to_dict()
        sources = [{'url': f"https://huggingface.co/{cfg['hf_hub_id']}/resolve/main/model.safetensors",
                    'hf_hub_id': cfg['hf_hub_id'], 'layout': 'timm', 'format': 'safetensors'}]
        if cfg.get('url'):     # the weights' original release file (for HaloNets, timm's own)
            sources.append({'url': cfg['url'], 'layout': 'timm', 'format': 'torch'})
        if info.release and info.release.tag == tag:
            sources.append(_source(info.release))
        res = cfg['input_size'][-1]
        out.append({'tag': tag, 'file': f'{ref}.{tag}.safetensors', 'sources': sources, 'sha256': None,
                    'num_classes': cfg.get('num_classes', 1000), 'resolution': res, 'crop_pct': cfg.get('crop_pct'),
                    'top1': info.top1 if tag.endswith('in1k') and 'in21k' not in tag and res == info.img_size
                    else None})
    return out


def _source(release):
    return {'url': release.url, 'layout': release.layout, 'format': 'torch'}


def build():
    out = {'schema': 1, 'cache_env': 'MIXZOO_WEIGHTS', 'models': {}}
    for name, info in MODELS.items():
        if info.reference_kind == 'timm':
            entries = _timm_entries(info)
        elif info.release:
            r = info.release
            entries = [{'tag': r.tag, 'file': r.filename, 'sources': [_source(r)], 'resolution': info.img_size,
                        'sha256': r.sha256, 'num_classes': 1000, 'crop_pct': get_pretrained_cfg(name).crop_pct,
                        'top1': info.top1}]
        else:
            entries = []
        out['models'][name] = {'family': info.family, 'reference': info.reference, 'checkpoints': entries}
        if not entries:
            out['models'][name]['note'] = 'no released weights (build-only / untrained in the reference)'
    return out


def files():
    return {'checkpoints/manifest.json': json.dumps(build(), indent=1) + '\n'}
