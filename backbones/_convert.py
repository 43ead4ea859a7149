"""Checkpoint conversion: any layout a family's filter accepts -> the zoo's state dict."""
import hashlib
import sys
from typing import Dict, Optional

import timm
import torch

from ._weights import match_state_dict, read_checkpoint


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def filter_fn_of(model: torch.nn.Module):
    return sys.modules[type(model).__module__].checkpoint_filter_fn


def head_classes(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Optional[int]:
    """Number of classes of the checkpoint's classifier, read in the zoo's layout."""
    key = f"{model.pretrained_cfg['classifier']}.weight"
    return state_dict[key].shape[0] if key in state_dict else None


def convert(name: str, path: str, prefer: str = 'model', num_classes: Optional[int] = None):
    """-> (model with the checkpoint loaded, its state dict). Raises ValueError on a mismatch."""
    raw = read_checkpoint(path, prefer=prefer)
    probe = timm.create_model(name, pretrained=False, num_classes=num_classes or 1000)
    if num_classes is None:
        try:
            n = head_classes(filter_fn_of(probe)(dict(raw), probe), probe)
        except ValueError:
            n = None
        if n and n != 1000:
            probe = timm.create_model(name, pretrained=False, num_classes=n)
    sd = match_state_dict(filter_fn_of(probe)(dict(raw), probe), probe)
    probe.load_state_dict(sd, strict=True)
    return probe, {k: v.detach().contiguous() for k, v in probe.state_dict().items()}
