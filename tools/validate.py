#!/usr/bin/env python
"""ImageNet-style evaluation of zoo models (timm's validate.py conventions).

    python tools/validate.py --model mz_maxvit_tiny_tf_224 --data-dir /data/imagenet \\
        --checkpoint ~/Downloads/maxvit_tiny_tf_224.in1k.safetensors
    python tools/validate.py --model 'mz_poolformer_s*' --data-dir /data/imagenet --amp bf16

--data-dir is an ImageFolder root (``<dir>/val/<wnid>/*.JPEG``, or ``<dir>/<wnid>/*``), or a flat
folder of images with --label-file (lines ``<file name> <class index>``). ImageFolder class folders
named by wnid (``n01440764``, ...) are labelled with their index in the ImageNet subset the model's
head predicts (timm's ImageNetInfo: 1000 classes -> ImageNet-1k), so a part of ImageNet val scores
against a full checkpoint; other folder names are numbered 0..n-1 in sorted order (a line says so).
Preprocessing comes from each model's pretrained_cfg (input size, crop_pct, interpolation,
mean/std); the flags override it. Without --checkpoint the model's released weights are looked
up locally (see checkpoints/README.md). Prints top-1 / top-5 / loss / img/s and appends a row to
--results-file (.csv or .json).
"""
import argparse
import csv
import fnmatch
import json
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import timm  # noqa: E402
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config  # noqa: E402

from _zoo import mixzoo  # noqa: E402  (tools/ is on sys.path: this script's folder)
from mixzoo._convert import convert  # noqa: E402
from mixzoo._registry import check_model_name  # noqa: E402
from mixzoo import ops  # noqa: E402

IMG_EXT = ('.jpeg', '.jpg', '.png', '.bmp', '.webp', '.ppm', '.tif', '.tiff')


class FlatFolder(torch.utils.data.Dataset):
    """Images in one folder, labels from a '<file name> <class index>' list."""

    def __init__(self, root, label_file, transform):
        from PIL import Image
        self.Image, self.root, self.transform = Image, root, transform
        self.samples = []
        with open(label_file) as f:
            for n, line in enumerate(f, 1):
                parts = line.replace(',', ' ').split()
                if not parts:
                    continue
                if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
                    raise ValueError(f'{label_file}:{n}: expected "<file name> <class index>", got {line.strip()!r}')
                self.samples.append((os.path.join(root, parts[0]), int(parts[1])))
        missing = [p for p, _ in self.samples if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f'{len(missing)} image(s) listed in {label_file} are missing, e.g. {missing[0]}')
        self.classes = sorted({c for _, c in self.samples})

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(self.Image.open(path).convert('RGB')), label


def folder_labels(classes, model):
    """-> (label of each sorted class folder, whether those are ImageNet indices, a line saying which)."""
    subset = infer_imagenet_subset(model)          # from the head's class count; None for other counts
    index = {w: i for i, w in enumerate(ImageNetInfo(subset).label_names())} if subset else {}
    if subset and all(c in index for c in classes):
        return [index[c] for c in classes], True, (f'{len(classes)} class folders are {subset} wnids: each is '
                                                   f'labelled with its {subset} index')
    if subset:
        odd = [repr(c) for c in classes if c not in index][:3]
        why = f'not {subset} wnids (e.g. {", ".join(odd)})'
    else:
        why = f'not read as ImageNet wnids (the model has {model.num_classes} classes, no ImageNet subset)'
    return list(range(len(classes))), False, (
        f'class folder names are {why}: labelled 0..{len(classes) - 1} in sorted name order, so accuracy '
        f'against a {model.num_classes}-class checkpoint is meaningful only if that is its class order')


def make_dataset(args, transform, model):
    from torchvision.datasets import ImageFolder
    root = args.data_dir
    if not os.path.isdir(root):
        raise FileNotFoundError(f'dataset folder not found: {root}')
    if args.label_file:
        return FlatFolder(root, args.label_file, transform)
    split = os.path.join(root, args.split)
    folder = split if os.path.isdir(split) else root
    subdirs = [d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))]
    if not subdirs:
        raise FileNotFoundError(f'no class folders under {folder}: expected {root}/{args.split}/<class>/*.JPEG, '
                                f'or a flat image folder with --label-file')
    ds = ImageFolder(folder, transform=transform)
    labels, ds.wnid_labels, ds.label_note = folder_labels(ds.classes, model)
    ds.target_transform = labels.__getitem__
    ds.labels = labels
    return ds


def topk_correct(logits, target, k):
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == target[:, None]).any(dim=1).sum().item()


def build_model(name, args):
    if args.checkpoint:
        prefer = 'model_ema' if args.use_ema else 'model'
        model, _ = convert(name, args.checkpoint, prefer=prefer, num_classes=args.num_classes)
    else:
        kw = {} if args.num_classes is None else dict(num_classes=args.num_classes)
        model = timm.create_model(name, pretrained=not args.no_pretrained, **kw)
    return model


def validate(name, args):
    device = torch.device(args.device)
    model = build_model(name, args).eval().to(device)
    overrides = {k: v for k, v in dict(input_size=(3, args.img_size, args.img_size) if args.img_size else None,
                                       crop_pct=args.crop_pct, interpolation=args.interpolation,
                                       mean=tuple(args.mean) if args.mean else None,
                                       std=tuple(args.std) if args.std else None).items() if v is not None}
    cfg = resolve_data_config(overrides, model=model)
    ds = make_dataset(args, create_transform(**cfg), model)
    n_cls = len(ds.classes)
    labels_max = max(ds.classes) if args.label_file else max(ds.labels)
    # folders numbered 0..n-1 are scored only against a head of exactly those n classes
    numbered = not args.label_file and not ds.wnid_labels
    if not args.label_file:
        print(f'[validate] {ds.label_note}')
    if (numbered and n_cls != model.num_classes) or labels_max >= model.num_classes:
        fix = (f'use a checkpoint with these {n_cls} classes' if args.checkpoint else
               f'pass --checkpoint with these {n_cls} classes (or --no-pretrained --num-classes {n_cls} for a smoke '
               f'test)')
        if numbered:
            fix = ('name ImageNet class folders by their wnid (a part of ImageNet val is then scored at its ImageNet '
                   f'indices), or {fix}')
        raise ValueError(f'{name}: the dataset has {n_cls} classes (labels up to {labels_max}) but the model has '
                         f'{model.num_classes} outputs; {fix}')
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                                         pin_memory=device.type == 'cuda')
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
    try:
        from tqdm import tqdm
        it = tqdm(loader, desc=name, disable=args.no_progress)
    except ImportError:
        it = loader
    n = top1 = top5 = 0
    loss = 0.
    t0 = time.perf_counter()
    with torch.inference_mode(), ops.forcing(args.backend):     # (names checked here, nothing global changed)
        for x, y in it:
            x, y = x.to(device), y.to(device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with ctx():
                logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction='sum').item()
            top1 += topk_correct(logits, y, 1)
            top5 += topk_correct(logits, y, 5)
            n += len(y)
    dt = time.perf_counter() - t0
    return dict(model=name, checkpoint=args.checkpoint or '', top1=round(100 * top1 / n, 3),
                top5=round(100 * top5 / n, 3), loss=round(loss / n, 5), images=n, img_per_s=round(n / dt, 2),
                img_size=cfg['input_size'][-1], crop_pct=cfg['crop_pct'], interpolation=cfg['interpolation'],
                amp=args.amp or 'none', backend=args.backend or 'auto')


def write_results(path, rows):
    if path.endswith('.json'):
        old = json.load(open(path)) if os.path.exists(path) else []
        json.dump(old + rows, open(path, 'w'), indent=1)
    else:
        new = not os.path.exists(path)
        with open(path, 'a', newline='') as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', nargs='+', required=True, help='zoo model name(s) or glob(s)')
    p.add_argument('--checkpoint', default=None, help='checkpoint file (any layout the family accepts)')
    p.add_argument('--use-ema', action='store_true', help="use the checkpoint's 'model_ema' entry")
    p.add_argument('--no-pretrained', action='store_true', help='random weights (smoke tests)')
    p.add_argument('--data-dir', required=True)
    p.add_argument('--split', default='val')
    p.add_argument('--label-file', default=None, help='flat folder labels: "<file name> <class index>" lines')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--img-size', type=int, default=None)
    p.add_argument('--crop-pct', type=float, default=None)
    p.add_argument('--interpolation', default=None)
    p.add_argument('--mean', type=float, nargs=3, default=None)
    p.add_argument('--std', type=float, nargs=3, default=None)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--amp', choices=['bf16', 'fp16'], default=None)
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--backend', default=None, help="op backends, e.g. 'window:reference' (MIXZOO_BACKEND syntax)")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--results-file', default=None, help='append results here (.csv or .json)')
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    names = []
    for pat in args.model:
        if any(c in pat for c in '*?['):
            found = [n for n in mixzoo.list_models() if fnmatch.fnmatch(n, pat)]
            if not found:
                p.error(f'no zoo model matches {pat!r}; known: {", ".join(mixzoo.list_models())}')
        else:
            try:
                found = [check_model_name(pat)]     # an unknown name: the error lists close matches
            except ValueError as e:
                p.error(str(e))
        names += [n for n in found if n not in names]
    if args.checkpoint and len(names) > 1:
        p.error('--checkpoint applies to one model; give a single --model')
    rows = []
    for name in names:
        try:
            r = validate(name, args)
        except (ValueError, FileNotFoundError, KeyError) as e:
            print(f'error: {e}', file=sys.stderr)
            return 2
        print(f"{name}: top-1 {r['top1']:.3f}  top-5 {r['top5']:.3f}  loss {r['loss']:.4f}  "
              f"{r['images']} images  {r['img_per_s']:.1f} img/s")
        rows.append(r)
    if args.results_file:
        write_results(args.results_file, rows)
    return 0


if __name__ == '__main__':
    sys.exit(main())
