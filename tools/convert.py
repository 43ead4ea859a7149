#!/usr/bin/env python
"""Convert an official or timm checkpoint into the zoo's safetensors (+ a JSON sidecar).

    python tools/convert.py --model mz_poolformer_s12 --checkpoint poolformer_s12.pth.tar
    python tools/convert.py --model mz_maxvit_tiny_tf_224 --checkpoint model.safetensors --out ~/.cache/mixzoo/weights

The input may be any layout the family's checkpoint_filter_fn accepts (timm's, the official
release's, wrapped in {'model': ...} / {'state_dict': ...}); it is read with weights_only loading.
Its sha256 is checked against checkpoints/manifest.json when the manifest lists one for a file of
that name. A checkpoint that does not fit the model is refused with its missing / unexpected keys
and shape mismatches. Output: <out>/<model>.safetensors and <model>.json (source, sha256s).
"""
import argparse
import json
import os
import sys
import time

from _zoo import mixzoo  # noqa: E402  (tools/ is on sys.path: this script's folder)
from mixzoo import _pretrained  # noqa: E402
from mixzoo._convert import convert  # noqa: E402
from mixzoo._pretrained import sha256_file  # noqa: E402


def manifest_sha(name, path):
    base = os.path.basename(path)
    for e in _pretrained.checkpoints(name):
        names = {e['file']} | {s['url'].rsplit('/', 1)[-1] for s in e['sources']}
        if base in names and e.get('sha256'):
            return e['sha256'], e
    return None, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', required=True)
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--out', default=None, help='output folder (default: $MIXZOO_WEIGHTS) or a .safetensors path')
    p.add_argument('--use-ema', action='store_true', help="take the checkpoint's 'model_ema' entry instead of 'model'")
    p.add_argument('--num-classes', type=int, default=None, help='default: read from the checkpoint head')
    p.add_argument('--sha256', default=None, help='expected sha256 of the input (overrides the manifest)')
    args = p.parse_args(argv)
    from safetensors.torch import save_file

    try:
        mixzoo.check_model_name(args.model)
    except ValueError as e:
        p.error(str(e))
    digest = sha256_file(args.checkpoint)
    expected, entry = (args.sha256, None) if args.sha256 else manifest_sha(args.model, args.checkpoint)
    if expected and expected.lower() != digest:
        print(f'error: sha256 of {args.checkpoint} is {digest}, expected {expected}'
              f'{" (checkpoints/manifest.json)" if entry else ""}: a different or damaged file', file=sys.stderr)
        return 2
    try:
        model, sd = convert(args.model, args.checkpoint, prefer='model_ema' if args.use_ema else 'model',
                            num_classes=args.num_classes)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    out = args.out or str(_pretrained.weights_dir())
    path = out if out.endswith('.safetensors') else os.path.join(out, f'{args.model}.safetensors')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path, metadata={'model': args.model, 'source_sha256': digest})
    side = dict(model=args.model, source=os.path.abspath(args.checkpoint), source_sha256=digest,
                source_sha256_verified=bool(expected), entry='model_ema' if args.use_ema else 'model',
                num_classes=model.num_classes, output=os.path.abspath(path), output_sha256=sha256_file(path),
                created=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
    with open(path[:-len('.safetensors')] + '.json', 'w') as f:
        json.dump(side, f, indent=1)
    print(f'{args.model}: wrote {path} ({len(sd)} tensors, {model.num_classes} classes); '
          f'source sha256 {digest}{" verified" if expected else " (not in the manifest)"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
