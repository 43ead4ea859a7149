"""Backend registry and dispatcher for the zoo's ops.

Every op registers its backends here with a declaration of what they support.  A call is
described by a :class:`Call` (device, dtype, head dim, sizes, whether autograd is needed);
each backend answers with a list of *reasons* it cannot run that call (empty = it can).
The dispatcher walks the op's priority list and returns the first backend with no reasons.

Forcing a backend: ``backend='name'`` on the op call, or the environment variable
``MIXZOO_BACKEND`` = ``<op>:<name>[,<op>:<name>...]`` (a bare ``<name>`` applies to every op).
A forced backend that cannot run raises :class:`BackendError` listing its reasons.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx

__all__ = ['Call', 'Backend', 'BackendError', 'register', 'backends', 'ops', 'select', 'forced_backend', 'forcing',
           'empty', 'poisoned_outputs']


class BackendError(RuntimeError):
    """No backend (or not the forced one) can run a call; the message lists the reasons."""


@dataclass(frozen=True)
class Call:
    """What an op call needs, as seen by the capability checks."""
    device: str                      # 'cpu', 'cuda', ...
    dtype: torch.dtype
    head_dim: Optional[int] = None
    requires_grad: bool = False
    sizes: Tuple[Tuple[str, int], ...] = ()   # op-specific sizes, e.g. (('window_area', 49),)

    def size(self, name: str, default: Optional[int] = None) -> Optional[int]:
        return dict(self.sizes).get(name, default)

    @staticmethod
    def of(t: torch.Tensor, *others: Optional[torch.Tensor], head_dim: Optional[int] = None, **sizes: int) -> 'Call':
        grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (t,) + others)
        return Call(t.device.type, t.dtype, head_dim, grad, tuple(sorted(sizes.items())))


def _fmt_dtypes(dtypes: Sequence[torch.dtype]) -> str:
    return '/'.join(str(d).replace('torch.', '') for d in dtypes)


_DEFAULT_TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4),
                torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.6e-2, 5e-2)}


@dataclass
class Backend:
    """A backend's declaration of what it supports.

    ``available`` returns a reason the backend cannot run at all on this machine (or None);
    ``limits`` maps a size name to its maximum; ``check`` adds op-specific reasons.
    ``auto_devices`` are the devices on which the backend may be picked without being forced
    (the Triton backends run on CPU only under the interpreter, for tests).
    """
    op: str
    name: str
    fn: Callable
    # 'meta' lets models be built and FLOP-counted without memory
    devices: Tuple[str, ...] = ('cpu', 'cuda', 'mps', 'xpu', 'meta')
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    head_dims: Optional[Tuple[int, int]] = None      # inclusive (min, max)
    autograd: bool = True
    limits: Dict[str, int] = field(default_factory=dict)
    available: Callable[[], Optional[str]] = lambda: None
    check: Optional[Callable[[Call], List[str]]] = None
    auto_devices: Optional[Tuple[str, ...]] = None
    doc: str = ''
    # (atol, rtol) against `reference` evaluated in float64, per input dtype (tests read these)
    tolerances: Dict[torch.dtype, Tuple[float, float]] = field(default_factory=lambda: dict(_DEFAULT_TOL))

    def tolerance(self, dtype: torch.dtype) -> Tuple[float, float]:
        return self.tolerances.get(dtype, (1e-5, 1e-5))

    def reasons(self, call: Call, forced: bool = False) -> List[str]:
        out = []
        # availability can be costly to learn (imports, a first compile): only for a device it supports
        why = self.available() if call.device in self.devices else None
        if why:
            out.append(why)
        devices = self.devices if forced or self.auto_devices is None else self.auto_devices
        if call.device not in devices:
            if call.device in self.devices:
                out.append(f'device {call.device} only when forced (backend={self.name!r})')
            else:
                out.append(f'device {call.device} not supported (supports {", ".join(self.devices)})')
        if call.dtype not in self.dtypes:
            out.append(f'dtype {str(call.dtype).replace("torch.", "")} not supported '
                       f'(supports {_fmt_dtypes(self.dtypes)})')
        if self.head_dims is not None and call.head_dim is not None:
            lo, hi = self.head_dims
            if not lo <= call.head_dim <= hi:
                out.append(f'head dim {call.head_dim} outside [{lo}, {hi}]')
        if call.requires_grad and not self.autograd:
            out.append('no backward (autograd) support')
        for name, hi in self.limits.items():
            v = call.size(name)
            if v is not None and v > hi:
                out.append(f'{name} {v} > {hi}')
        if self.check is not None:
            out.extend(self.check(call))
        return out

    def describe(self) -> str:
        parts = [f'devices={"/".join(self.devices)}', f'dtypes={_fmt_dtypes(self.dtypes)}']
        if self.head_dims:
            parts.append(f'head_dim={self.head_dims[0]}..{self.head_dims[1]}')
        parts += [f'{k}<={v}' for k, v in self.limits.items()]
        parts.append('autograd' if self.autograd else 'forward only')
        return ', '.join(parts)


_REGISTRY: Dict[str, Dict[str, Backend]] = {}
_PRIORITY: Dict[str, List[str]] = {}


def register(backend: Backend, priority: Optional[int] = None) -> Backend:
    """Add a backend; ``priority`` is its position in the op's list (default: last)."""
    _REGISTRY.setdefault(backend.op, {})[backend.name] = backend
    order = _PRIORITY.setdefault(backend.op, [])
    if backend.name in order:
        order.remove(backend.name)
    order.insert(len(order) if priority is None else priority, backend.name)
    return backend


def ops() -> List[str]:
    return sorted(_REGISTRY)


def backends(op: str) -> List[Backend]:
    """Backends of ``op`` in priority order."""
    if op not in _REGISTRY:
        raise KeyError(f'unknown op {op!r}; known ops: {", ".join(ops())}')
    return [_REGISTRY[op][n] for n in _PRIORITY[op]]


_SCOPED: Dict[str, str] = {}


@contextmanager
def forcing(**op_backends: str):
    """Force backends inside a ``with`` block, e.g. ``forcing(halo='reference')`` (over
    ``MIXZOO_BACKEND``). The counters use it to count the op as defined, not a shortcut of a fast path."""
    saved = dict(_SCOPED)
    _SCOPED.update(op_backends)
    try:
        yield
    finally:
        _SCOPED.clear()
        _SCOPED.update(saved)


def forced_backend(op: str) -> Optional[str]:
    """The backend ``forcing`` or ``MIXZOO_BACKEND`` forces for ``op`` (None if none is forced)."""
    if op in _SCOPED:
        return _SCOPED[op]
    spec = os.environ.get('MIXZOO_BACKEND', '').strip()
    if not spec:
        return None
    chosen = None
    for item in spec.split(','):
        item = item.strip()
        if not item:
            continue
        if ':' in item:
            o, name = (s.strip() for s in item.split(':', 1))
            if o == op:
                chosen = name
        elif chosen is None:
            chosen = item
    return chosen


def select(op: str, call: Call, backend: Optional[str] = None) -> Backend:
    """The backend that runs ``call``: the forced one if any, else the first that can."""
    table = {b.name: b for b in backends(op)}
    source = 'backend='
    if backend is None:
        backend = forced_backend(op)
        source = 'MIXZOO_BACKEND='
    if backend is not None:
        if backend not in table:
            raise BackendError(f'{op}: unknown backend {backend!r} (from {source}); '
                               f'known: {", ".join(table)}')
        b = table[backend]
        why = b.reasons(call, forced=True)
        if why:
            raise BackendError(f'{op}: backend {backend!r} (from {source}) cannot run this call '
                               f'[{_fmt_call(call)}]: ' + '; '.join(why))
        return b
    failures = []
    for b in table.values():
        why = b.reasons(call)
        if not why:
            return b
        failures.append(f'{b.name}: ' + '; '.join(why))
    raise BackendError(f'{op}: no backend can run this call [{_fmt_call(call)}]:\n  ' + '\n  '.join(failures))


def _fmt_call(call: Call) -> str:
    s = f'device={call.device}, dtype={str(call.dtype).replace("torch.", "")}'
    if call.head_dim is not None:
        s += f', head_dim={call.head_dim}'
    s += ''.join(f', {k}={v}' for k, v in call.sizes)
    if call.requires_grad:
        s += ', autograd'
    return s


# ---- output allocation (tests poison it with NaN to catch elements a kernel never writes) ----

_POISON = [False]


class poisoned_outputs:
    """Context manager: outputs allocated through :func:`empty` are filled with NaN."""

    def __enter__(self):
        self._prev, _POISON[0] = _POISON[0], True

    def __exit__(self, *exc):
        _POISON[0] = self._prev


def empty(*shape, dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs; NaN-filled inside :class:`poisoned_outputs`."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    return t.fill_(float('nan')) if _POISON[0] else t


# ---- shared availability checks --------------------------------------------------------------

def tracing() -> bool:
    """Inside torch.jit scripting / tracing, torch.compile / export or FX symbolic tracing: paths that
    call opaque kernels on raw data (a trace would record their output as a constant) must step aside
    for the traceable ones."""
    return (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.fx._symbolic_trace.is_fx_symbolic_tracing())


def triton_interpret() -> bool:
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


def triton_unavailable() -> Optional[str]:
    """Why Triton kernels cannot run here (None if they can: a CUDA GPU, or the interpreter)."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return f'triton not importable ({type(e).__name__}: {e})'
    if triton_interpret():
        return None
    if not torch.cuda.is_available():
        return 'no CUDA device (torch.cuda.is_available() is False); TRITON_INTERPRET=1 runs it on CPU'
    return None


def triton_interpreter_limits(call: Call) -> List[str]:
    """The Triton CPU interpreter computes through numpy, which has no bfloat16."""
    if call.device == 'cpu' and call.dtype == torch.bfloat16:
        return ['bfloat16 is not supported by the Triton CPU interpreter (numpy has no bfloat16); use a GPU']
    return []
