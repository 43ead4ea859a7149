"""Released checkpoints (checkpoints/manifest.json) and where ``pretrained=True`` looks for them.

Weights are never downloaded at run time. ``timm.create_model(name, pretrained=True)`` looks in
``$MIXZOO_WEIGHTS`` (default ``~/.cache/mixzoo/weights``) for, in order: ``<zoo name>.safetensors``
(what tools/convert.py writes), the manifest's file name for the checkpoint, or the file name of one
of its source URLs; if none is there it raises an error saying what to download and where to put it.
An explicit ``pretrained_cfg_overlay=dict(file=...)`` bypasses the lookup.
"""
import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional

_SOURCE_KEYS = ('file', 'url', 'hf_hub_id', 'state_dict')


def weights_dir() -> Path:
    return Path(os.environ.get('MIXZOO_WEIGHTS', Path.home() / '.cache' / 'mixzoo' / 'weights')).expanduser()


def manifest_path() -> Path:
    candidates = [os.environ.get('MIXZOO_MANIFEST'),
                  Path(__file__).resolve().parent.parent / 'checkpoints' / 'manifest.json',
                  Path(sys.prefix) / 'share' / 'mixzoo' / 'checkpoints' / 'manifest.json']
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise FileNotFoundError('checkpoints/manifest.json not found (set MIXZOO_MANIFEST to its path)')


@lru_cache(maxsize=1)
def manifest() -> Dict:
    with open(manifest_path(), encoding='utf-8') as f:
        return json.load(f)


def checkpoints(name: str) -> List[Dict]:
    entry = manifest()['models'].get(name)
    return entry['checkpoints'] if entry else []


def checkpoint_entry(name: str, tag: Optional[str] = None) -> Optional[Dict]:
    entries = checkpoints(name)
    if tag:
        entries = [e for e in entries if e['tag'] == tag]
    return entries[0] if entries else None


def candidate_files(name: str, tag: Optional[str] = None) -> List[Path]:
    d = weights_dir()
    out = [d / f'{name}.safetensors']
    e = checkpoint_entry(name, tag)
    if e:
        out.append(d / e['file'])
        # a source URL's last part where it is a file name (not HF's generic model.safetensors, nor the bare
        # 'content' of a OneDrive share link)
        names = [s['url'].rsplit('/', 1)[-1] for s in e['sources']]
        out += [d / n for n in names if n != 'model.safetensors' and '.' in n]
    return out


def resolve(name: str, pretrained: bool, kwargs: Dict) -> None:
    """Point a ``pretrained=True`` build at the local file (sets pretrained_cfg_overlay['file']),
    or raise a FileNotFoundError that says what to download and where to put it."""
    if not pretrained:
        return
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    if any(overlay.get(k) for k in _SOURCE_KEYS):
        return
    tag = None
    if '.' in name:
        name, tag = name.split('.', 1)
    for path in candidate_files(name, tag):
        if path.is_file():
            overlay['file'] = str(path)
            kwargs['pretrained_cfg_overlay'] = overlay
            return
    e = checkpoint_entry(name, tag)
    where = '\n  '.join(str(p) for p in candidate_files(name, tag))
    how = '' if not e else ('\nDownload one of:\n  ' + '\n  '.join(f"{s['url']}  ({s['layout']} layout)"
                                                                  for s in e['sources']))
    raise FileNotFoundError(
        f'{name}: pretrained weights not found locally (the zoo downloads nothing at run time). '
        f'Put the file at one of:\n  {where}{how}\n'
        f'or pass pretrained_cfg_overlay=dict(file=PATH); set MIXZOO_WEIGHTS to use another folder. '
        f'See checkpoints/README.md.')
