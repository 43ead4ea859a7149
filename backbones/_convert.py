"""Checkpoint conversion: any layout a family's filter accepts -> the zoo's state dict."""
import hashlib
from typing import Dict, Optional

import timm
import torch

from ._weights import prepare_state_dict, read_checkpoint


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def zoo_state_dict(name: str, raw: Dict[str, torch.Tensor], **model_kwargs):
    """-> (raw checkpoint in the zoo's layout, matched, the meta-device model it was matched against):
    the loader's own conversion (``prepare_state_dict``), for tools that need the keys before a build."""
    with torch.device('meta'):
        probe = timm.create_model(name, pretrained=False, **model_kwargs)
    return prepare_state_dict(raw, probe), probe


def head_classes(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Optional[int]:
    """Number of classes of the checkpoint's classifier, read in the zoo's layout."""
    key = f"{model.pretrained_cfg['classifier']}.weight"
    return state_dict[key].shape[0] if key in state_dict else None


def convert(name: str, path: str, prefer: str = 'model', num_classes: Optional[int] = None):
    """-> (model with the checkpoint loaded, its state dict): the checkpoint read once, its class count
    taken from its classifier unless given, then loaded as ``timm.create_model(pretrained=True)`` loads.
    Raises ValueError on a mismatch."""
    raw = read_checkpoint(path, prefer=prefer)
    if num_classes is None:
        num_classes = head_classes(*zoo_state_dict(name, raw)) or 1000
    model = timm.create_model(name, pretrained=True, num_classes=num_classes,
                              pretrained_cfg_overlay=dict(state_dict=raw, num_classes=num_classes))
    model.pretrained_cfg.update(state_dict=None, file=str(path), checkpoint_entry=prefer)
    return model, {k: v.detach().contiguous() for k, v in model.state_dict().items()}
