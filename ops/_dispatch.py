"""Backend registry and dispatcher for the zoo's ops.

Every op registers its backends here with a declaration of what they support.  A call is
described by a :class:`Call` (device, dtype, head dim, sizes, whether autograd is needed);
each backend answers with a list of *reasons* it cannot run that call (empty = it can).
The dispatcher walks the op's priority list and returns the first backend with no reasons.

Forcing a backend, strongest first: ``backend='name'`` on the op call (a model's ``backend=`` passes it to
every op call of its mixers), a ``with forcing(...)`` block, or the environment variable
``MIXZOO_BACKEND`` = ``<op>:<name>[,<op>:<name>...]`` (a bare ``<name>`` applies to every op).
A forced backend that cannot run raises :class:`BackendError` listing its reasons.
"""
from __future__ import annotations

import importlib
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx

__all__ = ['Call', 'Backend', 'BackendError', 'FLOATS', 'register', 'register_op', 'triton_kernels', 'backends', 'ops',
           'symbolic', 'select', 'forced_backend', 'forcing', 'parse_spec', 'check_spec', 'empty', 'poisoned_outputs']


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
        return Call(t.device.type, t.dtype, head_dim, records_grad(t, *others), tuple(sorted(sizes.items())))


def _fmt_dtypes(dtypes: Sequence[torch.dtype]) -> str:
    return '/'.join(str(d).replace('torch.', '') for d in dtypes)


FLOATS = (torch.float32, torch.float16, torch.bfloat16)   # what the kernels compute in (fp64: the oracle's)

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
    dtypes: Tuple[torch.dtype, ...] = FLOATS + (torch.float64,)
    head_dims: Optional[Tuple[int, int]] = None      # inclusive (min, max)
    autograd: bool = True
    limits: Dict[str, int] = field(default_factory=dict)
    available: Callable[[], Optional[str]] = lambda: None
    check: Optional[Callable[[Call], List[str]]] = None
    auto_devices: Optional[Tuple[str, ...]] = None
    # reasons not to pick it automatically (it runs when forced), e.g. measured slower on this CPU
    auto_check: Optional[Callable[[Call], List[str]]] = None
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
        if not forced and not out and self.auto_check is not None:
            out.extend(self.auto_check(call))
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


def register_op(op: str, **backends) -> None:
    """Register the backends of ``op`` in priority order (keyword order; the keyword is the backend's name):
    ``register_op('window', triton=triton_kernels(...), torch=eager.window_attention, reference=...)``.
    A value is the backend's function, or a dict of :class:`Backend` fields (``fn`` and capabilities);
    ``doc`` defaults to the function's docstring (a backend says what it is beside its code)."""
    for name, fields in backends.items():
        fields = dict(fields) if isinstance(fields, dict) else dict(fn=fields)
        doc = fields.pop('doc', None) or ' '.join((fields['fn'].__doc__ or '').split())
        if not doc:
            raise ValueError(f'{op}: backend {name!r} needs a doc (a docstring on {fields["fn"]!r} or doc=)')
        register(Backend(op, name, doc=doc, **fields))


def imported(module: str, name: str, dependency: str = 'triton') -> Callable:
    """``module.name`` for a backend whose dependency is optional (triton): imported here, at registration,
    where it imports (a first import inside a ``torch.compile``-traced call would be a graph break:
    dynamo does not trace imports); where it does not, a function that raises the import's error.
    The backend's ``available`` check keeps the dispatcher from choosing it there."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:  # pragma: no cover - depends on the install
        if (e.name or '').split('.')[0] != dependency:    # not the optional dependency: our own bug, say so
            raise
        reason = f'{module} could not be imported ({type(e).__name__}: {e})'

        def fn(*args, **kwargs):
            raise RuntimeError(reason)
        fn.__qualname__ = fn.__name__ = f'{module}.{name}'
        return fn


def triton_kernels(package: str, fn: str, *, validated: bool, doc: str, **fields) -> dict:
    """The fields of an op's Triton backend: ``<package>.triton.<fn>`` (see :func:`imported`); CUDA,
    and CPU under ``TRITON_INTERPRET=1`` when forced (the tests); fp32/fp16/bf16 unless ``dtypes`` says
    otherwise. Picked automatically on CUDA only once ``validated`` (run on a GPU), else only when forced."""
    when = ('CPU only under TRITON_INTERPRET=1 and when forced (tests)' if validated else
            'only when forced (not yet validated on a GPU; CPU under TRITON_INTERPRET=1)')
    return dict(fn=imported(f'{package}.triton', fn), devices=('cuda', 'cpu'),
                auto_devices=('cuda',) if validated else (), dtypes=fields.pop('dtypes', FLOATS),
                available=triton_unavailable, check=triton_interpreter_limits, doc=f'{doc}; {when}', **fields)


def ops() -> List[str]:
    return sorted(_REGISTRY)


def backends(op: str) -> List[Backend]:
    """Backends of ``op`` in priority order."""
    if op not in _REGISTRY:
        raise KeyError(f'unknown op {op!r}; known ops: {", ".join(ops())}')
    return [_REGISTRY[op][n] for n in _PRIORITY[op]]


Spec = Tuple[Optional[str], Dict[str, str]]   # (a name for every op, {op: name}); per-op names win


def parse_spec(spec: str) -> Spec:
    """``'<name>'``, ``'<op>:<name>[,<op>:<name>...]'`` or both mixed (``MIXZOO_BACKEND``'s syntax)."""
    every, per_op = None, {}
    for item in (s.strip() for s in spec.split(',')):
        if ':' in item:
            op, name = (s.strip() for s in item.split(':', 1))
            per_op[op] = name
        elif item and every is None:
            every = item
    return every, per_op


def check_spec(every: Optional[str], per_op: Dict[str, str], source: str,
               ops_used: Optional[Sequence[str]] = None) -> None:
    """Raise :class:`BackendError` naming the valid choices for an unknown op or backend name. With
    ``ops_used`` (a model's ops) the ops named must be among them and a name for every op must be a
    backend of each; without, a name for every op must be a backend of some op."""
    scope = list(ops_used) if ops_used is not None else ops()
    for op, name in per_op.items():
        if op not in scope:
            what = 'the model calls only' if ops_used is not None else 'known ops:'
            raise BackendError(f'{source}: unknown op {op!r}; {what} {", ".join(scope)}')
        if name not in _REGISTRY[op]:
            raise BackendError(f'{source}: unknown backend {name!r} for op {op!r}; '
                               f'known: {", ".join(_PRIORITY[op])}')
    if every is None:
        return
    lacking = [op for op in scope if op not in per_op and every not in _REGISTRY[op]]
    if ops_used is not None and lacking:
        raise BackendError(f'{source}: {every!r} is not a backend of ' + '; '.join(
            f'op {op!r} (known: {", ".join(_PRIORITY[op])})' for op in lacking) +
            (". Name it per op ('<op>:<name>,...')" if len(lacking) < len(scope) else ''))
    if ops_used is None and len(lacking) == len(scope):
        known = sorted({n for table in _REGISTRY.values() for n in table})
        raise BackendError(f'{source}: unknown backend {every!r}; known: {", ".join(known)} '
                           "(or '<op>:<name>' for one op)")


# the backends forced by the enclosing ``forcing`` blocks of this thread / task
_SCOPED: ContextVar[Spec] = ContextVar('mixzoo_forcing', default=(None, {}))


@contextmanager
def forcing(spec: Optional[str] = None, /, **op_backends: str):
    """Force backends inside a ``with`` block: ``forcing('reference')`` for every op, ``forcing(halo='reference')``
    for one, ``forcing('window:reference,halo:torch')`` in ``MIXZOO_BACKEND``'s syntax, or a mix (per-op names
    win). It wins over ``MIXZOO_BACKEND``; a ``backend=`` argument of an op call (or a model's ``backend=``)
    wins over it. A nested block adds to the enclosing one (a name for every op replaces it). Names are
    checked on entry; the state is a contextvar, so other threads and tasks are not affected. The counters
    use it to count an op as defined, not a shortcut of a fast path."""
    every, per_op = parse_spec(spec) if spec else (None, {})
    per_op.update(op_backends)
    check_spec(every, per_op, 'forcing')
    outer_every, outer = _SCOPED.get()
    token = _SCOPED.set((every, per_op) if every is not None else (outer_every, {**outer, **per_op}))
    try:
        yield
    finally:
        _SCOPED.reset(token)


def _forced(op: str) -> Tuple[Optional[str], str]:
    """(backend, where it comes from) that ``forcing`` or ``MIXZOO_BACKEND`` forces for ``op``."""
    every, per_op = _SCOPED.get()
    if op in per_op or every is not None:
        return per_op.get(op, every), 'forcing'
    every, per_op = parse_spec(os.environ.get('MIXZOO_BACKEND', ''))
    return per_op.get(op, every), 'MIXZOO_BACKEND='


def forced_backend(op: str) -> Optional[str]:
    """The backend ``forcing`` or ``MIXZOO_BACKEND`` forces for ``op`` (None if none is forced)."""
    return _forced(op)[0]


def select(op: str, call: Call, backend: Optional[str] = None) -> Backend:
    """The backend that runs ``call``: the forced one if any, else the first that can."""
    table = {b.name: b for b in backends(op)}
    source = 'backend='
    if backend is None:
        backend, source = _forced(op)
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


def records_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Autograd records a graph through one of ``tensors`` (None entries allowed): inference-only paths (in-place
    writes, kernels without a backward, measured inference routes) must step aside."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def dense_format(x: torch.Tensor) -> Optional[torch.memory_format]:
    """The memory format in which ``x``'s elements lie without gaps (``torch.contiguous_format``, or
    ``torch.channels_last`` for a 4-d channels-last map), None for other strides: a C kernel reads such a tensor as
    one flat buffer in that order, and ``t.contiguous(memory_format=...)`` brings another tensor to the same order."""
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else None


def symbolic(*sizes) -> bool:
    """Any of ``sizes`` is symbolic (torch.export / compile with dynamic shapes): code that skips work when a
    size is already a multiple (no padding, no crop) must not branch on it there (the branch is a guard that
    specialises the graph to the traced size); it takes a branch-free path instead."""
    return any(isinstance(s, torch.SymInt) for s in sizes)


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
