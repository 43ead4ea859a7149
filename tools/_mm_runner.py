"""What tools/train.py and tools/test.py share: read a config the way mmdet's / mmseg's tools do,
with the zoo's adapter registered (the configs' custom_imports name ``mixzoo.mm``)."""
import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument('config', help='config file (configs/mmdet/*.py or configs/mmseg/*.py)')
    ap.add_argument('--work-dir', help='where logs and checkpoints go (default ./work_dirs/<config name>)')
    from mmengine.config import DictAction
    ap.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                    help="override settings, e.g. train_dataloader.dataset.data_root=/data/coco/")
    ap.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    ap.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return ap


def load_config(args):
    from _zoo import mixzoo  # noqa: F401  (an error saying how to install it where it is not)
    import mixzoo.mm  # noqa: F401  (registers MixZooBackbone; mmengine checkpoints load on torch>=2.6)
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or str(
        Path('work_dirs') / Path(args.config).stem)
    return cfg


def runner(cfg):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
