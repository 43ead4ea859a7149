"""Train a detector / segmentor from a config, as mmdet's and mmseg's tools/train.py do.

    python tools/train.py configs/mmdet/mask-rcnn_davit-tiny_fpn_1x_coco.py [--resume [CKPT]] [--amp]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mm_runner import load_config, parser, runner  # noqa: E402


def main(argv=None):
    ap = parser(__doc__.strip().splitlines()[0])
    ap.add_argument('--resume', nargs='?', const='auto', default=None,
                    help='resume from CKPT, or (no value) from the latest checkpoint in the work dir')
    ap.add_argument('--amp', action='store_true', help='mixed-precision training')
    args = ap.parse_args(argv)
    cfg = load_config(args)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    runner(cfg).train()


if __name__ == '__main__':
    main()
