"""Released checkpoints (checkpoints/manifest.json) and where ``pretrained=True`` finds them.

``timm.create_model(name, pretrained=True)`` looks in the weights folder (``$MIXZOO_WEIGHTS``, else
``$MIXZOO_CACHE/weights``, else ``~/.cache/mixzoo/weights``) for, in order: ``<zoo name>.safetensors``
(what tools/convert.py writes), the manifest's file name for the checkpoint, or the file name of one of
its source URLs; then in the Hugging Face cache, for sources on the hub (timm's own weights: the file timm
downloads is the file the zoo loads). If none is there it downloads the manifest's sources in order: hub
sources through huggingface_hub into its cache, others (the authors' release files) into the weights folder
(a temporary file beside the target, moved into place only when complete), checking the manifest's sha256
where it records one. Offline (``MIXZOO_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) or when every source fails, the
error says what to download and where to put it. ``pretrained_cfg_overlay=dict(file=...)`` (or ``url=...``,
``hf_hub_id=...``) names the source instead.
"""
import hashlib
import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple


def weights_dir() -> Path:
    if os.environ.get('MIXZOO_WEIGHTS'):
        return Path(os.environ['MIXZOO_WEIGHTS']).expanduser()
    return Path(os.environ.get('MIXZOO_CACHE') or Path.home() / '.cache' / 'mixzoo').expanduser() / 'weights'


def manifest_path() -> Path:
    """The manifest shipped as package data (``mixzoo.checkpoints``: the checkout's checkpoints/ in an
    editable install), or ``$MIXZOO_MANIFEST``."""
    if os.environ.get('MIXZOO_MANIFEST'):
        return Path(os.environ['MIXZOO_MANIFEST'])
    from importlib.resources import files
    return Path(str(files('mixzoo.checkpoints') / 'manifest.json'))


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


def _offline() -> bool:
    return any(os.environ.get(k, '').lower() in ('1', 'true', 'yes', 'on')
               for k in ('MIXZOO_OFFLINE', 'HF_HUB_OFFLINE'))


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _refused(url: str, sha256: str) -> ValueError:
    return ValueError(f'{url}: the downloaded file does not have the sha256 {sha256} recorded in '
                      f'checkpoints/manifest.json (a different or damaged file); nothing was kept')


def download(url: str, dst: Path, sha256: Optional[str] = None, progress: bool = True) -> Path:
    """Fetch ``url`` to ``dst``: written to a temporary file in the same folder and moved into place only
    when complete and (given ``sha256``) verified, so a failed or refused download leaves nothing behind."""
    from torch.hub import download_url_to_file
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(url, str(dst), hash_prefix=sha256.lower() if sha256 else None, progress=progress)
    except RuntimeError as e:
        if 'invalid hash value' in str(e):
            raise _refused(url, sha256) from e
        raise
    return dst


def _hub_parts(source: Dict) -> Tuple[str, str, str]:
    """(endpoint, repo id, file name) of a Hugging Face hub source ``{'hf_hub_id', 'url': .../resolve/...}``."""
    repo = source['hf_hub_id']
    endpoint, _, rest = source['url'].partition(f'/{repo}/resolve/')
    return endpoint, repo, rest.split('/', 1)[1]


def _from_hub(source: Dict, sha256: Optional[str], cached_only: bool) -> Optional[Path]:
    """A hub file through huggingface_hub, so it lands in (or is found in) the cache timm uses too
    (``HF_HOME`` / ``HF_HUB_CACHE``); None when ``cached_only`` and it is not cached."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    endpoint, repo, filename = _hub_parts(source)
    if cached_only:
        found = try_to_load_from_cache(repo, filename)
        return Path(found) if isinstance(found, str) else None
    path = Path(hf_hub_download(repo, filename, endpoint=endpoint, library_name='mixzoo'))
    if sha256 and sha256_file(path) != sha256.lower():
        blob = path.resolve()
        path.unlink()
        blob.unlink(missing_ok=True)
        raise _refused(source['url'], sha256)
    return path


def resolve(name: str, tag: Optional[str] = None, url: Optional[str] = None,
            hf_hub_id: Optional[str] = None) -> Path:
    """The local weights file of ``name`` (``tag``: one of its checkpoints), downloaded if need be;
    ``url`` / ``hf_hub_id``: that source instead of the manifest's. Raises FileNotFoundError saying what to
    download and where to put it when no file is found and nothing could be fetched."""
    if '.' in name:
        name, tag = name.split('.', 1)
    if url:
        return download(url, weights_dir() / url.rsplit('/', 1)[-1], None)
    if hf_hub_id:
        return _from_hub({'hf_hub_id': hf_hub_id, 'url': f'https://huggingface.co/{hf_hub_id}/resolve/main/'
                          f'model.safetensors'}, None, cached_only=_offline())
    e = checkpoint_entry(name, tag)
    for path in candidate_files(name, tag):
        if path.is_file():
            return path
    sources = e['sources'] if e else []
    for s in sources:                     # timm's (and the user's) Hugging Face cache
        found = _from_hub(s, e.get('sha256'), cached_only=True) if 'hf_hub_id' in s else None
        if found is not None:
            return found
    where = '\n  '.join(str(p) for p in candidate_files(name, tag))
    how = '' if not e else ('\nDownload one of:\n  ' + '\n  '.join(f"{s['url']}  ({s['layout']} layout)"
                                                                  for s in sources))
    failures = []
    if e and not _offline():
        for s in sources:
            print(f'{name}: downloading {s["url"]}', file=sys.stderr)
            try:
                if 'hf_hub_id' in s:
                    return _from_hub(s, e.get('sha256'), cached_only=False)
                return download(s['url'], weights_dir() / e['file'], e.get('sha256'))
            except Exception as err:          # (network, HTTP, refused hash: try the next source)
                failures.append(f'{s["url"]}: {type(err).__name__}: {err}')
    why = ('no release checkpoint is known for it (checkpoints/manifest.json)' if not e else
           'offline (MIXZOO_OFFLINE / HF_HUB_OFFLINE set)' if _offline() else
           'the download failed:\n  ' + '\n  '.join(failures))
    raise FileNotFoundError(
        f'{name}: pretrained weights not found locally and {why}.\nPut the file at one of:\n  {where}{how}\n'
        f'or pass pretrained_cfg_overlay=dict(file=PATH); set MIXZOO_WEIGHTS (or MIXZOO_CACHE) to use another '
        f'folder. See checkpoints/README.md.')
