"""``pretrained=True`` downloads the manifest's sources when no local file is found: tested against a
server on 127.0.0.1 started here, serving generated checkpoints in timm's layout (safetensors, as a Hugging
Face hub repository: fetched through huggingface_hub into its cache, the cache timm uses) and in an official
release layout (a torch training checkpoint, fetched into the weights folder), with the manifest pointed at it."""
import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from mixzoo import _pretrained
from helpers import official_layout, randomize_, rel_err

# a reduced L2ViT (both block kinds in every stage) keeps the official-layout case small
L2VIT_SMALL = dict(depths=(2, 2, 2, 2), dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4))


class _Server:
    def __init__(self, root):
        self.requests = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

            def end_headers(self):
                """What the hub answers for a file of a repository: its sha256 as ETag, the commit."""
                path = Path(self.translate_path(self.path))
                if '/resolve/' in self.path and path.is_file():
                    self.send_header('ETag', f'"{_sha(path)}"')
                    self.send_header('X-Repo-Commit', '0' * 40)
                super().end_headers()

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Handler, directory=str(root)))
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def release(tmp_path, monkeypatch):
    """Generated release files served on the loopback, a manifest naming them, an empty weights folder."""
    served = tmp_path / 'served'
    served.mkdir()
    pf = randomize_(timm.create_model('mz_poolformer_s12')).eval()
    hub = served / 'timm' / 'poolformer_s12.sail_in1k' / 'resolve' / 'main'
    hub.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in pf.state_dict().items()}, hub / 'model.safetensors')
    lv = randomize_(timm.create_model('mz_l2vit_tiny', **L2VIT_SMALL)).eval()
    torch.save({'model': official_layout('l2vit', lv.state_dict()), 'epoch': 3}, served / 'l2vit_tiny.pth')
    server = _Server(served)

    def entry(file, source, sha, layout):
        return {'checkpoints': [{'tag': 'in1k', 'file': file, 'sha256': sha, 'num_classes': 1000, 'sources': [
            {'url': f'{server.url}/missing/{file}', 'layout': layout},      # a dead source first: the next is tried
            dict(source, layout=layout)]}]}
    manifest = {'schema': 1, 'models': {
        'mz_poolformer_s12': entry('poolformer_s12.sail_in1k.safetensors', {
            'url': f'{server.url}/timm/poolformer_s12.sail_in1k/resolve/main/model.safetensors',
            'hf_hub_id': 'timm/poolformer_s12.sail_in1k'}, _sha(hub / 'model.safetensors'), 'timm'),
        'mz_l2vit_tiny': entry('L2ViT-Tiny-checkpoint-best-ema.pth', {'url': f'{server.url}/l2vit_tiny.pth'},
                               _sha(served / 'l2vit_tiny.pth'), 'official')}}
    path = tmp_path / 'manifest.json'
    path.write_text(json.dumps(manifest))
    monkeypatch.setenv('MIXZOO_MANIFEST', str(path))
    monkeypatch.setenv('MIXZOO_WEIGHTS', str(tmp_path / 'weights'))
    monkeypatch.delenv('MIXZOO_OFFLINE', raising=False)
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_CACHE', str(tmp_path / 'hf'))   # (read when called)
    _pretrained.manifest.cache_clear()
    yield dict(server=server, manifest=manifest, path=path, weights=tmp_path / 'weights', hf=tmp_path / 'hf',
               poolformer=pf, l2vit=lv)
    server.close()
    _pretrained.manifest.cache_clear()


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _hub_files(hf):
    return sorted(p.relative_to(hf).as_posix() for p in hf.rglob('*') if p.is_file() and '.locks' not in p.parts)


@pytest.mark.parametrize('name', ['mz_poolformer_s12', 'mz_l2vit_tiny'])
def test_pretrained_downloads_verifies_and_loads(release, name):
    kw = L2VIT_SMALL if name == 'mz_l2vit_tiny' else {}
    ref = release['poolformer' if name == 'mz_poolformer_s12' else 'l2vit']
    model = timm.create_model(name, pretrained=True, **kw).eval()
    e = release['manifest']['models'][name]['checkpoints'][0]
    if name == 'mz_l2vit_tiny':        # a release file: into the weights folder, under the manifest's name
        path = release['weights'] / e['file']
        assert _files(release['weights']) == [e['file']]                # no leftovers
        assert [r.split('/')[1] for r in release['server'].requests] == ['missing', 'l2vit_tiny.pth']
    else:                              # a hub file: through huggingface_hub, into its cache (shared with timm)
        assert _files(release['weights']) == []
        path = release['hf'] / 'models--timm--poolformer_s12.sail_in1k' / 'snapshots' / ('0' * 40) / 'model.safetensors'
        assert path.is_file() and release['server'].requests[0].startswith('/missing/')
    assert _sha(path) == e['sha256']
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) < 1e-6
    assert model.pretrained_cfg['file'] == str(path)
    n = len(release['server'].requests)
    timm.create_model(name, pretrained=True, **kw)                       # found locally now: no second download
    assert len(release['server'].requests) == n


@pytest.mark.parametrize('name', ['mz_poolformer_s12', 'mz_l2vit_tiny'])
def test_wrong_sha256_is_refused_and_nothing_is_left(release, name):
    release['manifest']['models'][name]['checkpoints'][0]['sha256'] = '0' * 64
    release['path'].write_text(json.dumps(release['manifest']))
    _pretrained.manifest.cache_clear()
    with pytest.raises(FileNotFoundError, match=r'(?s)download failed.*sha256.*nothing was kept.*Put the file at'):
        timm.create_model(name, pretrained=True, **(L2VIT_SMALL if name == 'mz_l2vit_tiny' else {}))
    assert _files(release['weights']) == []                               # no file, no .partial
    assert not [f for f in _hub_files(release['hf']) if '/blobs/' in f or '/snapshots/' in f]


def test_offline_says_so_and_fetches_nothing(release, monkeypatch):
    monkeypatch.setenv('MIXZOO_OFFLINE', '1')
    with pytest.raises(FileNotFoundError,
                       match=r'(?s)offline.*poolformer_s12\.sail_in1k\.safetensors.*Download one of'):
        timm.create_model('mz_poolformer_s12', pretrained=True)
    assert release['server'].requests == [] and _files(release['weights']) == []


def test_offline_uses_a_filled_hugging_face_cache(release, monkeypatch):
    """HF_HUB_OFFLINE with the file already in the hub cache (e.g. downloaded by timm): loaded, no request."""
    from huggingface_hub import hf_hub_download
    hf_hub_download('timm/poolformer_s12.sail_in1k', 'model.safetensors', endpoint=release['server'].url)
    n = len(release['server'].requests)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    model = timm.create_model('mz_poolformer_s12', pretrained=True).eval()
    assert len(release['server'].requests) == n and _files(release['weights']) == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), release['poolformer'](x)) < 1e-6


def test_weights_folder_follows_mixzoo_cache(monkeypatch, tmp_path):
    monkeypatch.delenv('MIXZOO_WEIGHTS', raising=False)
    monkeypatch.setenv('MIXZOO_CACHE', str(tmp_path / 'cache'))
    assert _pretrained.weights_dir() == tmp_path / 'cache' / 'weights'
    monkeypatch.setenv('MIXZOO_WEIGHTS', str(tmp_path / 'w'))
    assert _pretrained.weights_dir() == tmp_path / 'w'
