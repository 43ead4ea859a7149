"""Checkpoint conversion: any layout a family reads -> a zoo model holding it (and its state dict)."""
from typing import Optional

import timm

from ._registry import family_of
from ._weights import load_state_dict, read_checkpoint


def convert(name: str, path: str, prefer: str = 'model', num_classes: Optional[int] = None):
    """-> (model with the checkpoint loaded, its state dict): the checkpoint read once and loaded through
    the one loading path, the model's head sized to the checkpoint's classifier. ValueError on a mismatch,
    including a ``num_classes`` that is not the checkpoint's class count."""
    raw = read_checkpoint(path, prefer=prefer)
    model = load_state_dict(timm.create_model(name), raw, family_of(name), classes='checkpoint')
    if num_classes is not None and num_classes != model.num_classes:
        own = model.num_classes
        raise ValueError(f'{path} has a {own}-class classifier, so --num-classes {num_classes} does not fit it: drop '
                         f'--num-classes (num_classes=; the class count is read from the checkpoint) and evaluate on '
                         f'data of its {own} classes, or pass a checkpoint with {num_classes} classes')
    model.pretrained_cfg = {**model.pretrained_cfg, 'file': str(path), 'checkpoint_entry': prefer}
    return model, {k: v.detach().contiguous() for k, v in model.state_dict().items()}
