"""Tiny datasets in the formats mmdet and mmseg read (COCO json with boxes and polygon masks; the
ADE20K folder layout), drawn so a detector / segmentor has something learnable."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

COCO_CLASSES = ('person', 'bicycle')     # names from COCO's list, so CocoDataset keeps them


def _rects(rng, h, w, n):
    out = []
    for _ in range(n):
        bw, bh = rng.integers(w // 5, w // 2), rng.integers(h // 5, h // 2)
        x, y = rng.integers(0, w - bw), rng.integers(0, h - bh)
        out.append((int(x), int(y), int(bw), int(bh)))
    return out


def make_coco(root, n_train=4, n_val=2, size=(96, 128), seed=0):
    """root/{train,val}/*.jpg + root/annotations/instances_{train,val}.json; returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    cats = [dict(id=i + 1, name=n) for i, n in enumerate(COCO_CLASSES)]
    for split, n in (('train', n_train), ('val', n_val)):
        (root / split).mkdir(exist_ok=True)
        images, anns = [], []
        for i in range(n):
            img = (rng.random((h, w, 3)) * 40).astype(np.uint8)
            for x, y, bw, bh in _rects(rng, h, w, 2):
                cat = int(rng.integers(1, len(cats) + 1))
                img[y:y + bh, x:x + bw] = (200, 40, 40) if cat == 1 else (40, 200, 40)
                poly = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
                anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=cat, bbox=[x, y, bw, bh],
                                 area=float(bw * bh), iscrowd=0, segmentation=[[float(v) for v in poly]]))
            name = f'{split}_{i:03d}.jpg'
            Image.fromarray(img).save(root / split / name, quality=95)
            images.append(dict(id=i + 1, file_name=name, height=h, width=w))
        with open(root / 'annotations' / f'instances_{split}.json', 'w') as f:
            json.dump(dict(images=images, annotations=anns, categories=cats), f)
    return root


def make_ade(root, n_train=4, n_val=2, size=(64, 80), seed=0):
    """root/images/{training,validation}/*.jpg + root/annotations/.../*.png (ADE20K layout: label 0 is
    'other', reduce_zero_label maps it to ignore); returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    for split, n in (('training', n_train), ('validation', n_val)):
        (root / 'images' / split).mkdir(parents=True, exist_ok=True)
        (root / 'annotations' / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = (rng.random((h, w, 3)) * 40).astype(np.uint8)
            seg = np.ones((h, w), np.uint8)          # class 1 (wall) everywhere ...
            for k, (x, y, bw, bh) in enumerate(_rects(rng, h, w, 3)):
                cls = 2 + k % 3                      # ... and classes 2-4 in rectangles
                seg[y:y + bh, x:x + bw] = cls
                img[y:y + bh, x:x + bw] = (60 * cls % 256, 30 * cls, 200)
            seg[:2] = 0                              # a strip of 'other' (ignored)
            Image.fromarray(img).save(root / 'images' / split / f'ADE_{split}_{i:08d}.jpg', quality=95)
            Image.fromarray(seg).save(root / 'annotations' / split / f'ADE_{split}_{i:08d}.png')
    return root
