"""What every mixer around a dispatched op shares: the op's name and the backend its calls force, and
:func:`set_backend`, which sets that backend model-wide (``timm.create_model(name, backend=...)``)."""
from typing import Mapping, Optional, Union

import torch.nn as nn

from ..ops._dispatch import check_spec, parse_spec

BackendSpec = Union[None, str, Mapping[str, str]]


class OpMixer(nn.Module):
    """A token mixer calling the dispatched op ``op``; ``backend`` (None: the dispatcher's choice, i.e.
    ``forcing`` / ``MIXZOO_BACKEND`` / capabilities) is the ``backend=`` of each of its op calls, unless its
    forward is given one."""
    op: str = ''
    backend: Optional[str] = None

    def op_backend(self, backend: Optional[str]) -> Optional[str]:
        return self.backend if backend is None else backend


def set_backend(model: nn.Module, backend: BackendSpec) -> nn.Module:
    """Force the op backend of every mixer of ``model``: a name for every op (``'reference'``), per op
    (``{'window': 'reference'}``, or ``'window:reference,halo:torch'`` in ``MIXZOO_BACKEND``'s syntax; a
    bare name there covers the other ops), or None to restore the dispatcher's choice. Names are checked
    against the op registry for the ops the model calls. Returns the model."""
    mixers = [m for m in model.modules() if isinstance(m, OpMixer)]
    used = sorted({m.op for m in mixers})
    if isinstance(backend, str):
        every, per_op = parse_spec(backend)
    else:
        every, per_op = None, dict(backend or {})
    if backend is not None and not used:
        raise ValueError(f'backend={backend!r}: {type(model).__name__} has no mixer that calls a dispatched op '
                         '(its token mixing is plain torch), so there is no op backend to choose')
    check_spec(every, per_op, f'backend={backend!r}', used)
    for m in mixers:
        m.backend = per_op.get(m.op, every)
    return model
