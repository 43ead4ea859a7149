"""Reading checkpoint files safely and unwrapping the containers training scripts save."""
from typing import Dict, Mapping

import torch

_CONTAINER_KEYS = ('state_dict', 'model', 'module', 'net')


def unwrap_state_dict(sd: Mapping, prefer: str = 'model') -> Dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: ``{'model': ...}`` / ``{'state_dict': ...}`` wrappers
    are opened (``prefer`` first, e.g. 'model_ema'), and a ``module.`` (DDP) prefix is removed."""
    if not isinstance(sd, Mapping):
        raise TypeError(f'checkpoint is a {type(sd).__name__}, not a state dict')
    if prefer in sd and isinstance(sd[prefer], Mapping):
        sd = sd[prefer]
    else:
        for key in _CONTAINER_KEYS:
            if key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
                break
    if sd and all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    return dict(sd)
