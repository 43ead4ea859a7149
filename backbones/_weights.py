"""The one loading path of every tool: read (safe reader, containers unwrapped) -> prepare (the family's
renames / transform, one match) -> load (timm's head / first-conv rules). ``create_model(pretrained=True)``,
tools/convert.py, tools/validate.py and the mm adapter all go through ``read_checkpoint`` and
``load_state_dict``; where the file comes from is mixzoo._pretrained's (resolve / download)."""
from typing import Dict, Mapping, Optional

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


def _model_name(model) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def _prefix(cfg: Dict, key: str) -> Optional[str]:
    return f'{cfg[key]}.' if isinstance(cfg.get(key), str) else None


def match_state_dict(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Return ``state_dict`` if it fits ``model``; else raise a ValueError that lists the missing and
    unexpected keys and the shape mismatches (a checkpoint of another family or variant). Fitting allows
    what loading adapts (a classifier of another class count or none, a first conv of other input channels)
    and the keys of parts the model has pruned (``model.pruned_keys``: features_only, the mm adapter)."""
    own = model.state_dict()
    pruned = getattr(model, 'pruned_keys', frozenset())
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifier, first_conv = _prefix(cfg, 'classifier'), _prefix(cfg, 'first_conv')
    # a model built with num_classes=0 has no head beyond the pooling; a checkpoint's head may hold more than
    # the classifier (SHViT's BatchNorm1d beside its linear): the whole head module is what the model left out
    headless = getattr(model, 'num_classes', None) == 0 and classifier and classifier.count('.') > 1
    head_module = classifier.rsplit('.', 2)[0] + '.' if headless else None

    def adapted(k, a=None, b=None):
        if head_module and k.startswith(head_module) and k not in own:
            return True
        if classifier and k.startswith(classifier):
            return a is None or b is None or tuple(a[1:]) == tuple(b[1:])       # class count only
        if first_conv and k.startswith(first_conv) and a is not None and b is not None:
            return a[0] == b[0] and tuple(a[2:]) == tuple(b[2:])                 # input channels only
        return False
    missing = [k for k in own if k not in state_dict and not adapted(k)]
    unexpected = [k for k in state_dict if k not in own and k not in pruned and not adapted(k)]
    shapes = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
              for k, v in own.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
              and not adapted(k, state_dict[k].shape, v.shape)]
    if missing or unexpected or shapes:
        def show(items, n=8):
            return ', '.join(items[:n]) + (f', ... ({len(items)} in all)' if len(items) > n else '')
        parts = [f'the checkpoint does not match {_model_name(model)} (a checkpoint of another model or variant?)']
        if missing:
            parts.append(f'{len(missing)} missing key(s): {show(missing)}')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected key(s): {show(unexpected)}')
        if shapes:
            parts.append(f'{len(shapes)} shape mismatch(es): {show(shapes, 4)}')
        raise ValueError('; '.join(parts))
    return state_dict


def prepare_state_dict(state_dict: Mapping, model: torch.nn.Module, fam) -> Dict[str, torch.Tensor]:
    """The one conversion of a (read, unwrapped) checkpoint for ``model`` of family record ``fam``: the
    layout that fits (as is, or through the family's rename table), the family's transform (reshapes,
    resized tables), and one match against the model (a ValueError naming every mismatch otherwise)."""
    sd = dict(state_dict)
    if fam.renames is not None:
        own = model.state_dict()
        renamed = fam.renames.to_zoo(sd)
        if sum(k in own for k in renamed) > sum(k in own for k in sd):
            sd = renamed
    if fam.transform is not None:
        sd = fam.transform(sd, model)
    return match_state_dict(sd, model)


def load_state_dict(model: torch.nn.Module, state_dict: Mapping, fam, classes: str = 'model') -> torch.nn.Module:
    """Prepare ``state_dict`` (read and unwrapped: ``read_checkpoint``) for ``model`` and load it.

    As timm's loader does, a classifier of another class count is left out (the model keeps its own,
    freshly initialised head; none where num_classes=0) and a first conv of 3 input channels is adapted to
    the model's ``in_chans``; ``classes='checkpoint'`` instead resizes the model's head to the checkpoint's
    class count (converting / evaluating a fine-tuned checkpoint). Keys of pruned parts are dropped."""
    sd = prepare_state_dict(state_dict, model, fam)
    own = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifier, first_conv = _prefix(cfg, 'classifier'), _prefix(cfg, 'first_conv')
    head = {k: v for k, v in sd.items() if classifier and k.startswith(classifier)}
    rows = next((v.shape[0] for k, v in head.items() if k.endswith('weight')), None)
    if classes == 'checkpoint' and rows is not None and rows != getattr(model, 'num_classes', rows):
        model.reset_classifier(rows)
        own = model.state_dict()
    elif classes not in ('model', 'checkpoint'):
        raise ValueError(f"classes must be 'model' or 'checkpoint', got {classes!r}")
    drop = {k for k, v in head.items() if k not in own or own[k].shape != v.shape}
    for k, v in list(sd.items()):
        if first_conv and k.startswith(first_conv) and k in own and v.ndim == 4 and v.shape[1] != own[k].shape[1]:
            from timm.models import adapt_input_conv
            sd[k] = adapt_input_conv(own[k].shape[1], v)
    kept = {k: v for k, v in sd.items() if k in own and k not in drop}
    missing = set(own) - set(kept)
    if missing - {k for k in own if classifier and k.startswith(classifier)}:   # (match_state_dict said so)
        raise ValueError(f'{_model_name(model)}: keys left unloaded: {sorted(missing)[:8]}')
    model.load_state_dict(kept, strict=not missing)
    return model


def read_checkpoint(path: str, prefer: str = 'model') -> Dict[str, torch.Tensor]:
    """Read a checkpoint file safely: safetensors, or torch.load(weights_only=True), which refuses
    pickles that are not plain tensors/containers. Errors name the file and the likely cause.
    ``prefer`` picks the entry of a training checkpoint ('model', or 'model_ema')."""
    import os
    if not os.path.isfile(path):
        where = 'a folder, not a file' if os.path.isdir(path) else 'no such file'
        raise FileNotFoundError(f'checkpoint file not found: {path} ({where}; give the path of a .pth / .pth.tar / '
                                f'.safetensors file, or leave the file out and pretrained=True looks in the weights '
                                f'folder, see checkpoints/README.md)')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:
            raise ValueError(f'could not read safetensors checkpoint {path} (truncated or corrupted?): {e}') from e
    import argparse
    try:
        # training scripts (timm's, ConvNeXt-derived ones such as L2ViT's) store their argparse.Namespace
        # beside the weights; allowed as timm's own loader allows it, nothing else is unpickled
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        # torch's own text advises weights_only=False, which would execute whatever the file pickles: keep only
        # what it says about the file
        msg = str(e)
        advice = ('Weights only load failed', 'Re-running', 'Please file an issue', 'Check the documentation')
        lines = [ln.strip().split(' Please use')[0] for ln in msg.splitlines()]
        detail = '; '.join(ln for ln in lines if ln and not ln.startswith(advice)) or type(e).__name__
        if 'Unsupported global' in msg or 'allowlist' in msg:
            raise ValueError(f'refusing to load {path}: it is not a plain state dict (it pickles Python objects, '
                             f'which weights_only loading does not execute): {detail}') from e
        raise ValueError(f'could not read checkpoint {path} (truncated or corrupted file, or not a torch.save / '
                         f'safetensors file): {detail}') from e
    if prefer != 'model' and isinstance(obj, Mapping) and prefer not in obj:
        raise KeyError(f'{path} has no {prefer!r} entry (entries: {", ".join(map(str, obj))})')
    return unwrap_state_dict(obj, prefer=prefer)
