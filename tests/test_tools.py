"""tools/validate.py, tools/convert.py and the checkpoint manifest, on data the tests make."""
import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import timm
import torch

import mixzoo
from mixzoo import MODELS, _pretrained
from helpers import official_layout, randomize_, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import convert as convert_tool  # noqa: E402
import validate as validate_tool  # noqa: E402

CLASSES = ['n01440764', 'n01443537', 'n01484850', 'n01491361']
PER_CLASS = 3


@pytest.fixture(scope='module')
def imagefolder(tmp_path_factory):
    """val/<wnid>/*.JPEG, each class its own texture."""
    from PIL import Image
    root = tmp_path_factory.mktemp('imagenet')
    g = torch.Generator().manual_seed(0)
    for c, wnid in enumerate(CLASSES):
        d = root / 'val' / wnid
        d.mkdir(parents=True)
        for i in range(PER_CLASS):
            base = torch.rand(3, 1, 1, generator=g) * 200
            img = (base + 55 * torch.rand(3, 80 + 7 * i, 96, generator=g)).clamp(0, 255).byte()
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f'ILSVRC2012_val_{c}{i}.JPEG', quality=95)
    return root


@pytest.fixture(scope='module')
def fitted_checkpoint(imagefolder, tmp_path_factory):
    """mz_poolformer_s12 with random weights and a 4-class head solved (least squares on the
    pre-logits of exactly these images, preprocessed as validate.py does) to classify them all."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder
    model = randomize_(timm.create_model('mz_poolformer_s12', num_classes=len(CLASSES))).eval()
    ds = ImageFolder(imagefolder / 'val', transform=create_transform(**resolve_data_config({}, model=model)))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        f = model.forward_head(model.forward_features(x), pre_logits=True).double()
    fa = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)
    target = torch.full((len(f), len(CLASSES)), -5.0, dtype=f.dtype)
    target[torch.arange(len(f)), y] = 5.0
    sol = torch.linalg.lstsq(fa, target).solution          # (D + 1, K)
    with torch.no_grad():
        model.head.fc.weight.copy_(sol[:-1].T.float())
        model.head.fc.bias.copy_(sol[-1].float())
        assert (model(x).argmax(1) == y).all()
    path = tmp_path_factory.mktemp('ck') / 'fitted.pth'
    torch.save({'model': model.state_dict(), 'epoch': 3}, path)
    return path


def _run_validate(tmp_path, *argv):
    out = tmp_path / 'res.json'
    rc = validate_tool.main([*argv, '--results-file', str(out), '--no-progress', '--batch-size', '5',
                             '--workers', '0'])
    return rc, (json.load(open(out)) if out.exists() else None)


def test_validate_reaches_100_percent_with_a_fitted_checkpoint(imagefolder, fitted_checkpoint, tmp_path):
    rc, res = _run_validate(tmp_path, '--model', 'mz_poolformer_s12', '--checkpoint', str(fitted_checkpoint),
                            '--data-dir', str(imagefolder))
    assert rc == 0
    assert res[-1]['top1'] == 100.0 and res[-1]['top5'] == 100.0 and res[-1]['images'] == len(CLASSES) * PER_CLASS


def test_validate_counts_a_shuffled_set(imagefolder, fitted_checkpoint, tmp_path):
    """Move one image of each of 3 classes into the next class: 9 of 12 stay right (75%)."""
    shuffled = tmp_path / 'shuffled'
    shutil.copytree(imagefolder, shuffled)
    for c in range(3):
        src = shuffled / 'val' / CLASSES[c] / f'ILSVRC2012_val_{c}0.JPEG'
        shutil.move(src, shuffled / 'val' / CLASSES[c + 1] / src.name)
    rc, res = _run_validate(tmp_path, '--model', 'mz_poolformer_s12', '--checkpoint', str(fitted_checkpoint),
                            '--data-dir', str(shuffled), '--channels-last')
    assert rc == 0 and res[-1]['top1'] == 75.0


def _timm_validate(model, root, batch_size=5):
    """timm's validate.py (v1.0.31) on CPU, step by step through timm's own library: resolve_data_config from
    the model, create_dataset(root, split='validation') (timm's folder parser: classes in sorted order),
    create_loader with the config's size / interpolation / mean / std / crop_pct / crop_mode, no prefetcher (CPU),
    CrossEntropyLoss averaged over images, timm.utils.accuracy top-1 / top-5."""
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.utils import accuracy
    cfg = resolve_data_config({}, model=model, use_test_size=True)
    dataset = create_dataset('', root=str(root), split='validation')
    loader = create_loader(dataset, input_size=cfg['input_size'], batch_size=batch_size, interpolation=cfg['interpolation'],
                           mean=cfg['mean'], std=cfg['std'], num_workers=0, crop_pct=cfg['crop_pct'],
                           crop_mode=cfg['crop_mode'], device=torch.device('cpu'), use_prefetcher=False)
    n, loss, top1, top5 = 0, 0., 0., 0.
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            a1, a5 = accuracy(out, y, topk=(1, 5))
            loss += torch.nn.functional.cross_entropy(out, y).item() * len(y)
            top1, top5, n = top1 + a1.item() * len(y), top5 + a5.item() * len(y), n + len(y)
    return dict(top1=top1 / n, top5=top5 / n, loss=loss / n, images=n)


def test_validate_reports_what_timms_validate_does(imagefolder, fitted_checkpoint, tmp_path):
    """A timm-family model, one checkpoint, one folder: tools/validate.py on the zoo model and timm's validation
    pipeline on timm's own model give the same top-1, top-5 and loss. The checkpoint is a 1000-class one whose
    first four rows (the folder's wnids are ImageNet-1k classes 0-3) are the fitted head with two rows exchanged
    and some noise, so that top-1 is neither 0 nor 100."""
    fitted = torch.load(fitted_checkpoint, weights_only=True)['model']
    sd = randomize_(timm.create_model('poolformer_s12'), seed=3).state_dict()
    sd.update({k: v for k, v in fitted.items() if not k.startswith('head.fc')})
    g = torch.Generator().manual_seed(0)
    w, b = sd['head.fc.weight'], sd['head.fc.bias']
    swap = [0, 1, 3, 2]                                    # classes 2 and 3 exchanged: half the images wrong
    w[:4] = fitted['head.fc.weight'][swap] + 0.05 * torch.randn(4, w.shape[1], generator=g)
    b[:4] = fitted['head.fc.bias'][swap]
    path = tmp_path / 'poolformer_s12_1k.pth'
    torch.save(sd, path)
    ref = timm.create_model('poolformer_s12', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    want = _timm_validate(ref, imagefolder)
    rc, res = _run_validate(tmp_path, '--model', 'mz_poolformer_s12', '--checkpoint', str(path),
                            '--data-dir', str(imagefolder))
    got = res[-1]
    assert rc == 0 and got['images'] == want['images'] == len(CLASSES) * PER_CLASS
    assert 0 < want['top1'] < 100 and 0 < want['top5'] <= 100, want
    assert got['top1'] == pytest.approx(want['top1'], abs=1e-3) and got['top5'] == pytest.approx(want['top5'], abs=1e-3)
    assert got['loss'] == pytest.approx(want['loss'], rel=1e-4)


def test_validate_flat_folder_with_label_file(imagefolder, fitted_checkpoint, tmp_path):
    flat = tmp_path / 'flat'
    flat.mkdir()
    lines = []
    for c, wnid in enumerate(CLASSES):
        for f in sorted((imagefolder / 'val' / wnid).iterdir()):
            shutil.copy(f, flat / f.name)
            lines.append(f'{f.name} {c}')
    (tmp_path / 'labels.txt').write_text('\n'.join(lines))
    rc, res = _run_validate(tmp_path, '--model', 'mz_poolformer_s12', '--checkpoint', str(fitted_checkpoint),
                            '--data-dir', str(flat), '--label-file', str(tmp_path / 'labels.txt'))
    assert rc == 0 and res[-1]['top1'] == 100.0


def test_validate_clear_errors(imagefolder, fitted_checkpoint, tmp_path, capsys):
    rc, _ = _run_validate(tmp_path, '--model', 'mz_poolformer_s12', '--checkpoint', str(fitted_checkpoint),
                          '--data-dir', str(tmp_path / 'nowhere'))
    assert rc == 2 and 'dataset folder not found' in capsys.readouterr().err
    full = tmp_path / 'full.pth'
    torch.save(timm.create_model('poolformer_s12').state_dict(), full)
    named = tmp_path / 'named'     # folders that are not wnids: numbered 0..3, which a 1000-class head cannot score
    for c, wnid in enumerate(CLASSES):
        shutil.copytree(imagefolder / 'val' / wnid, named / 'val' / f'class_{c}')
    rc, _ = _run_validate(tmp_path, '--model', 'mz_poolformer_s12', '--checkpoint', str(full),
                          '--data-dir', str(named))
    out, err = capsys.readouterr()
    assert rc == 2 and 'the dataset has 4 classes' in err and 'the model has 1000 outputs' in err
    assert "not imagenet-1k wnids (e.g. 'class_0'" in out and 'labelled 0..3 in sorted name order' in out
    assert 'meaningful only if that is its class order' in out and 'name ImageNet class folders by their wnid' in err
    rc, _ = _run_validate(tmp_path, '--model', 'mz_poolformer_s24', '--checkpoint', str(fitted_checkpoint),
                          '--data-dir', str(imagefolder))
    assert rc == 2 and 'does not match mz_poolformer_s24' in capsys.readouterr().err


SUBSET = {'n01530575': 10, 'n02085620': 151, 'n04592741': 908}    # ImageNet-1k wnid -> index


def test_validate_scores_wnid_folders_at_their_imagenet_indices(imagefolder, fitted_checkpoint, tmp_path, capsys):
    """3 wnid folders against a 1000-class head whose rows 10 / 151 / 908 are the fitted classes 1..3:
    100% only if each folder is labelled with its ImageNet-1k index (numbered 0..2 it would score 0%)."""
    sub = tmp_path / 'sub'
    for c, wnid in enumerate(SUBSET, 1):
        shutil.copytree(imagefolder / 'val' / CLASSES[c], sub / 'val' / wnid)
    sd = torch.load(fitted_checkpoint)['model']
    w, b = sd['head.fc.weight'], sd['head.fc.bias']
    sd['head.fc.weight'], sd['head.fc.bias'] = torch.zeros(1000, w.shape[1]), torch.full((1000,), -100.)
    for c, i in enumerate(SUBSET.values(), 1):
        sd['head.fc.weight'][i], sd['head.fc.bias'][i] = w[c], b[c]
    ck = tmp_path / 'in1k.pth'
    torch.save({'model': sd}, ck)
    assert validate_tool.folder_labels(sorted(SUBSET), types.SimpleNamespace(num_classes=1000))[:2] == \
        (list(SUBSET.values()), True)
    rc, res = _run_validate(tmp_path, '--model', 'mz_poolformer_s12', '--checkpoint', str(ck), '--data-dir', str(sub))
    assert rc == 0 and res[-1]['top1'] == 100.0 and res[-1]['top5'] == 100.0 and res[-1]['images'] == 3 * PER_CLASS
    out = capsys.readouterr().out
    assert '3 class folders are imagenet-1k wnids: each is labelled with its imagenet-1k index' in out
    # "--num-classes that matches" with a 1000-class checkpoint: a clear error, not a size-mismatch traceback
    rc, _ = _run_validate(tmp_path, '--model', 'mz_poolformer_s12', '--checkpoint', str(ck), '--data-dir', str(sub),
                          '--num-classes', '3')
    err = capsys.readouterr().err
    assert rc == 2 and 'has a 1000-class classifier, so --num-classes 3 does not fit it' in err
    assert 'drop --num-classes' in err and 'size mismatch' not in err


def test_validate_unknown_model_names_close_matches(imagefolder, tmp_path, capsys):
    for name, said in [('mz_poolformer_s1', 'did you mean mz_poolformer_s12'),
                       ('mz_nothing_*', "no zoo model matches 'mz_nothing_*'")]:
        with pytest.raises(SystemExit) as e:
            validate_tool.main(['--model', 'mz_poolformer_s12', name, '--data-dir', str(imagefolder)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err and f"'{name}'" in err


def _reference_layouts(name, tmp_path):
    """(release-layout file, logits function of the reference model) for a zoo model: timm's model and
    layout, or for official-reference families the zoo model's random weights in the official layout."""
    kind, ref_name = MODELS[name].reference.split(':', 1)
    if kind == 'timm':
        ref = randomize_(timm.create_model(ref_name)).eval()
        sd = ref.state_dict()
    else:
        ref = randomize_(timm.create_model(name)).eval()
        sd = official_layout(MODELS[name].family, ref.state_dict())
    path = tmp_path / f'{name}_ref.pth'
    torch.save({'state_dict': sd}, path)
    return path, ref


@pytest.mark.parametrize('family', sorted(mixzoo.families()))
def test_convert_round_trip_every_family(family, tmp_path):
    from safetensors.torch import load_file
    name = next(n for n, m in MODELS.items() if m.family == family and not m.build_only)
    path, ref = _reference_layouts(name, tmp_path)
    assert convert_tool.main(['--model', name, '--checkpoint', str(path), '--out', str(tmp_path / 'out')]) == 0
    out = tmp_path / 'out' / f'{name}.safetensors'
    side = json.load(open(tmp_path / 'out' / f'{name}.json'))
    assert side['model'] == name and len(side['source_sha256']) == 64 and side['output_sha256']
    assert set(load_file(out)) == set(timm.create_model(name).state_dict())
    zoo = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out))).eval()
    x = torch.randn(1, 3, MODELS[name].img_size, MODELS[name].img_size)
    with torch.no_grad():
        assert rel_err(zoo(x), ref(x)) < 1e-5


def test_convert_refuses_mismatch_and_bad_sha(tmp_path, capsys):
    path, _ = _reference_layouts('mz_poolformer_s12', tmp_path)
    assert convert_tool.main(['--model', 'mz_maxvit_tiny_tf_224', '--checkpoint', str(path),
                              '--out', str(tmp_path)]) == 2
    assert 'does not match mz_maxvit_tiny_tf_224' in capsys.readouterr().err
    assert convert_tool.main(['--model', 'mz_poolformer_s12', '--checkpoint', str(path), '--out', str(tmp_path),
                              '--sha256', '0' * 64]) == 2
    assert 'expected 0000' in capsys.readouterr().err


def test_manifest_lists_every_model_and_parses():
    man = _pretrained.manifest()
    assert set(man['models']) == set(mixzoo.list_models())
    for name, entry in man['models'].items():
        assert entry['family'] == MODELS[name].family and entry['reference'] == MODELS[name].reference
        ref = MODELS[name].reference.split(':', 1)[1]
        assert entry['checkpoints'] or (not timm.list_pretrained(ref + '.*') and entry.get('note')), \
            f'{name}: the reference has released weights but the manifest lists none'
        for ck in entry['checkpoints']:
            assert set(ck) >= {'tag', 'file', 'sources', 'sha256', 'num_classes', 'resolution', 'top1'}
            assert ck['sources'] and all(s['url'].startswith('https://') and s['layout'] for s in ck['sources'])
            assert ck['sha256'] is None or len(ck['sha256']) == 64
            assert ck['resolution'] in (224, 256, 384, 512)


def test_pretrained_lookup_uses_the_local_cache_or_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv('MIXZOO_WEIGHTS', str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r'(?s)pretrained weights not found locally.*'
                                                r'mz_poolformer_s12\.safetensors.*huggingface\.co/timm/poolformer_s12'):
        timm.create_model('mz_poolformer_s12', pretrained=True)
    ref = randomize_(timm.create_model('poolformer_s12')).eval()
    torch.save(ref.state_dict(), tmp_path / 'poolformer_s12.pth.tar')      # the official file name
    zoo = timm.create_model('mz_poolformer_s12', pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(zoo(x), ref(x)) < 1e-5


def test_readme_evaluation_command_parses(capsys):
    readme = open(os.path.join(ROOT, 'checkpoints', 'README.md')).read()
    assert 'tools/validate.py' in readme and 'tools/convert.py' in readme
    with pytest.raises(SystemExit) as e:     # (in this process: a subprocess spent 15 s importing torch)
        validate_tool.main(['--help'])
    assert e.value.code == 0 and '--data-dir' in capsys.readouterr().out


def test_ci_fails_when_mm_or_dependency_tests_skip(tmp_path):
    """conftest turns a skip for a missing dependency (a whole module at import, or one test) and any
    skipped mm test into a failure when CI is set; locally they stay skips."""
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(here, 'conftest.py'), tmp_path / 'conftest.py')
    (tmp_path / 'pytest.ini').write_text('[pytest]\nmarkers =\n    mm: mm\n')
    (tmp_path / 'test_module_skip.py').write_text(
        "import pytest\nfrom conftest import MISSING_DEP\n"
        "pytest.importorskip('no_such_package_zz', reason=f'{MISSING_DEP}: no_such_package_zz')\n"
        "def test_a():\n    pass\n")
    (tmp_path / 'test_mm_skip.py').write_text(
        "import pytest\n@pytest.mark.mm\ndef test_b():\n    pytest.skip('mmdet absent')\n")
    for ci, want, workers in (('true', 1, ['-n', '2']), ('', 0, [])):   # CI runs the suite under pytest-xdist
        env = {**os.environ, 'CI': ci}
        r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *workers, str(tmp_path)],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
        assert (r.returncode != 0) == bool(want), r.stdout[-2000:]
        if ci:
            assert 'CI must run' in r.stdout


def test_benchmark_runs_models_and_op_tables(capsys):
    """tools/benchmark.py (the README's main job) on a tiny setting: one model beside timm, and the halo
    op's table, forward (every backend that can run, the compiled one included) and forward+backward."""
    import benchmark
    from benchpage import cells
    assert benchmark.main(['--model', 'mz_poolformer_s12', '--batch-size', '1', '--reps', '1', '--img-size', '64']) == 0
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if ln.startswith('| ')]
    head, row = cells(lines[0]), cells(next(ln for ln in lines if cells(ln)[0] == 'mz_poolformer_s12'))
    assert len({len(ln) for ln in lines}) == 1                       # padded: every line of the table as wide
    assert row[head.index('reference')] == 'timm:poolformer_s12' and float(row[head.index('ratio')]) > 0
    assert row[head.index('dGMACs_%')] == '-'                        # 64 is not the published size
    assert '- `dGMACs_%`: ' in out and '- `ratio`: ' in out and '- `-`: ' in out      # the legend
    assert 'page: not written' in err                                # a run of chosen models: no page
    assert benchmark.main(['--op', 'halo', '--batch-size', '1', '--reps', '1']) == 0
    out = capsys.readouterr().out
    assert 'timm HaloAttn' in out and 'zoo mixer [torch] NHWC' in out
    from mixzoo.ops.halo import cpu
    assert ('zoo mixer [cpu]' in out) == (cpu.unavailable() is None)
    assert benchmark.main(['--op', 'halo', '--batch-size', '1', '--reps', '1', '--backward']) == 0
    out = capsys.readouterr().out
    assert 'forward+backward' in out and 'zoo mixer [torch]' in out and '[cpu]' not in out


def test_benchmark_header_progress_and_quick_mode(capsys, monkeypatch):
    """The header names the CPU, torch threads, allocator and versions; progress (model i of n, elapsed
    seconds) goes to stderr; --quick takes each family's smallest variant, batch 2, best of 3."""
    import benchmark
    import benchpage
    import machine
    quick = benchmark.quick_models()
    assert sorted(MODELS[n].family for n in quick) == mixzoo.families()
    for n in quick:
        others = [m.gmacs for m in MODELS.values() if m.family == MODELS[n].family and not m.build_only and m.gmacs]
        assert not MODELS[n].build_only and MODELS[n].gmacs == min(others), n
    monkeypatch.setattr(benchmark, 'quick_models', lambda: ['mz_shvit_s1', 'mz_poolformer_s12'])
    assert benchmark.main(['--quick', '--speed', 'none', '--img-size', '64', '--no-page']) == 0
    out, err = capsys.readouterr()
    head = out.splitlines()[:3]
    assert head[0].startswith(f'CPU: {machine.cpu_model()} (') and ' cores, load ' in head[0]
    assert f'({torch.get_num_threads()} threads' in head[1] and f'timm {timm.__version__}' in head[1]
    assert f'allocator: {machine.allocator()}' in head[1]
    assert 'batch 2, float32, best of 3, quick mode' in head[2]
    assert [benchpage.cells(ln)[0] for ln in out.splitlines() if ln.startswith('| ')][1:] == \
        ['mz_shvit_s1', 'mz_poolformer_s12']
    assert re.search(r'^\[1/2 \d+s\] mz_shvit_s1: parameters and GMACs$', err, re.M), err
    assert re.search(r'^\[2/2 \d+s\] mz_poolformer_s12: parameters and GMACs$', err, re.M), err
    assert re.search(r'^\[2/2 \d+s\] done: 2 models$', err, re.M), err


def test_benchmark_writes_its_machine_section_and_keeps_the_others(tmp_path, capsys, monkeypatch):
    """A run writes its table into the page as this machine's section (CPU model + ISA; --quick: its
    'quick look' section) with the header, date and legend; a second run replaces that section only, and
    another machine's section and the historic ones stay as they were."""
    import benchmark
    import benchpage
    import machine
    page = tmp_path / 'BENCHMARKS.md'
    other = ('<!-- section: Intel Xeon Platinum 8480+, AVX-512 -->\n## Intel Xeon Platinum 8480+, AVX-512\n\n'
             '| model | ratio |\n|---|---:|\n| mz_shvit_s1 | 1.10 |\n\n')
    earlier = '<!-- section: earlier: AMD EPYC, AVX2, 2026-12-04 -->\n## Earlier: figures by hand\n\n'
    page.write_text('# Benchmarks\n\nabove the sections\n\n' + other + earlier)
    monkeypatch.setattr(benchmark, 'quick_models', lambda: ['mz_shvit_s1'])
    assert benchmark.main(['--quick', '--speed', 'none', '--page', str(page)]) == 0
    key = machine.machine_key('cpu') + ', quick look'
    assert f'added the section "{key}"' in capsys.readouterr().err
    text = page.read_text()
    assert text.startswith('# Benchmarks\n\nabove the sections\n\n')
    assert benchpage.section_keys(str(page)) == ['Intel Xeon Platinum 8480+, AVX-512', key,
                                                 'earlier: AMD EPYC, AVX2, 2026-12-04']
    mine = benchpage.find_section(str(page), key)
    assert f'## {key}\n' in mine and re.search(r'Measured \d{4}-\d\d-\d\d \d\d:\d\d UTC', mine)
    assert f'CPU: {machine.cpu_model()} (' in mine and f'timm {timm.__version__}' in mine and 'mixzoo ' in mine
    rows = [benchpage.cells(ln) for ln in mine.splitlines() if ln.startswith('| ')]
    assert rows[0][:3] == ['model', 'reference', 'params_M'] and [r[0] for r in rows[1:]] == ['mz_shvit_s1']
    assert '- `dGMACs_%`: ' in mine and '`tools/official_bench.py' in mine
    # a second run replaces this machine's section in place and leaves the others
    monkeypatch.setattr(benchmark, 'quick_models', lambda: ['mz_poolformer_s12'])
    assert benchmark.main(['--quick', '--speed', 'none', '--img-size', '64', '--page', str(page)]) == 0
    assert f'replaced the section "{key}"' in capsys.readouterr().err
    assert len(benchpage.section_keys(str(page))) == 3
    mine = benchpage.find_section(str(page), key)
    assert 'mz_poolformer_s12' in mine and 'mz_shvit_s1' not in mine
    assert benchpage.find_section(str(page), 'Intel Xeon Platinum 8480+, AVX-512') == other
    assert benchpage.find_section(str(page), 'earlier: AMD EPYC, AVX2, 2026-12-04') == earlier.rstrip('\n') + '\n'
    # the default page is only written by the full run or --quick; historic sections are never rewritten
    assert benchmark.run_kind(benchmark.argparse.Namespace(
        quick=False, model=['mz_shvit_s1'], img_size=None, batch_size=None, reps=None, backend=None,
        compare_backend=None, threads=None, speed='default', dtype='float32')) == 'custom'
    with pytest.raises(ValueError, match='historic'):
        benchpage.update_page(str(page), 'earlier: AMD EPYC, AVX2, 2026-12-04', 'x', '')


def test_install_scripts_say_how_to_call_them_and_show_build_progress(tmp_path):
    """install_mm.sh without a Python that has torch says how to call it (and names no ../shared path);
    its build watcher reports compiled object files out of ninja's total while a (here fake) build runs;
    `tools/env.sh` alone prints only the venv path on stdout."""
    tools = os.path.join(ROOT, 'tools')
    r = subprocess.run(['bash', os.path.join(tools, 'install_mm.sh'), sys.executable + '-missing'],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ''
    assert 'usage: bash tools/install_mm.sh PYTHON' in r.stderr and '"$(bash tools/env.sh)/bin/python"' in r.stderr
    for script in ('install_mm.sh', 'env.sh'):    # ../shared only where install_mm.sh looks for CI's wheel
        shared = [ln.strip() for ln in open(os.path.join(tools, script)) if '../shared' in ln]
        assert all(ln.startswith('for w in "$root/../shared/wheels/') for ln in shared), (script, shared)
    build = tmp_path / 'src' / 'build' / 'temp'
    build.mkdir(parents=True)
    fake = (f'sleep 1; printf "build {build}/a.o: compile a.cpp\\nbuild {build}/b.o: compile b.cpp\\n'
            f'build {build}/_ext.so: link\\n" > {build}/build.ninja; sleep 1.5; touch {build}/a.o; sleep 1.5')
    r = subprocess.run(['bash', '-c', f'source {tools}/install_mm.sh; ( {fake} ) & '
                        f'MIXZOO_PROGRESS_S=1 watch_build {tmp_path / "src"} $! $(date +%s)'],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == '', r.stderr
    assert 'mmcv build: 0/2 object files compiled (0%)' in r.stderr, r.stderr
    assert re.search(r'mmcv build: 1/2 object files compiled \(50%\), 0 min so far, last: a\.o', r.stderr), r.stderr
    r = subprocess.run(['bash', os.path.join(tools, 'env.sh')], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1 and os.path.isdir(r.stdout.strip()), r


def test_machine_allocator_names_preloads_and_settings(monkeypatch):
    import machine
    monkeypatch.setenv('LD_PRELOAD', '/opt/lib/libtcmalloc_minimal.so.4')
    monkeypatch.setenv('MALLOC_MMAP_THRESHOLD_', '4000000000')
    a = machine.allocator()
    assert 'tcmalloc' in a and 'LD_PRELOAD=/opt/lib/libtcmalloc_minimal.so.4' in a
    assert 'MALLOC_MMAP_THRESHOLD_=4000000000' in a
    monkeypatch.delenv('LD_PRELOAD')
    monkeypatch.setenv('MALLOC_CONF', 'background_thread:true')
    assert 'MALLOC_CONF=background_thread:true' in machine.allocator()
    assert 'glibc malloc (default)' not in machine.allocator()
