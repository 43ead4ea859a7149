"""Evaluate a checkpoint with a config's test set and metric, as mmdet's and mmseg's tools/test.py do.

    python tools/test.py configs/mmseg/upernet_davit-tiny_512x512-160k_ade20k.py CHECKPOINT
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mm_runner import load_config, parser, runner  # noqa: E402


def main(argv=None):
    ap = parser(__doc__.strip().splitlines()[0])
    ap.add_argument('checkpoint', help='checkpoint file (mmengine format, e.g. work_dirs/.../epoch_12.pth)')
    args = ap.parse_args(argv)
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    return runner(cfg).test()


if __name__ == '__main__':
    main()
