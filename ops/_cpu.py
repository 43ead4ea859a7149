"""CPU-specific choices, decided on each CPU from measurement.

Where the zoo has two routes to the same result on CPU, which is faster depends on the CPU: torch's
wheels send ``F.linear`` to MKL's sgemm, which on AMD CPUs takes a slower path than oneDNN's kernels and
on Intel CPUs is as fast; the halo op's C kernel wins where the batched products it replaces are slow.
So no route is assumed from one vendor: each :class:`Choice` times its options on representative
shapes the first time a process needs it (a fraction of a second) and keeps the faster. The decision is
cached in ``$MIXZOO_CACHE/cpu-choices.json`` (default ``~/.cache/mixzoo``) under this CPU's signature
(model, vector ISA, torch version, torch threads), so later processes on the machine read it instead.

``MIXZOO_CPU=<choice>:<option>[,...]`` forces options (e.g. ``MIXZOO_CPU=linear:blas``);
``python -m mixzoo.ops info`` shows every decision with its timings; ``info --retune`` measures again.
"""
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ['Choice', 'register', 'choice', 'decision', 'choices', 'retune', 'signature', 'cpu_model', 'cpu_flags',
           'interleaved', 'explain']

ENV = 'MIXZOO_CPU'
_MARGIN = 0.05   # how much faster than the first option another must measure to be chosen


@dataclass(frozen=True)
class Choice:
    name: str
    options: Tuple[str, ...]                      # the first one is taken where nothing could be measured
    measure: Callable[[], Dict[str, float]]       # option -> seconds (best of several); absent: cannot run here
    # (an option other than the first is chosen only when it measures over 5% faster than the first)
    doc: str


_CHOICES: Dict[str, Choice] = {}
_DECIDED: Dict[Tuple[str, str], dict] = {}   # (choice, signature) -> decision


def register(name: str, options: Tuple[str, ...], measure: Callable[[], Dict[str, float]], doc: str) -> None:
    _CHOICES[name] = Choice(name, tuple(options), measure, doc)


def choices() -> Dict[str, Choice]:
    return dict(_CHOICES)


def cpu_model() -> str:
    """'AMD EPYC 7B13', 'Intel(R) Xeon(R) Platinum 8480+', ... (Linux: /proc/cpuinfo; else what Python knows)."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.lower().startswith(('model name', 'hardware', 'cpu model')):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown CPU'


def cpu_flags() -> set:
    """The CPU's feature flags ('avx512_bf16', 'amx_bf16', ...; Linux /proc/cpuinfo, empty elsewhere)."""
    try:
        with open('/proc/cpuinfo') as f:
            return next((set(ln.split(':', 1)[1].split()) for ln in f if ln.startswith('flags')), set())
    except OSError:
        return set()


_ISA_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile')


_SIGNATURES: Dict[int, str] = {}


def signature() -> str:
    """What a decision holds for: the CPU model, its matrix / vector ISA, torch's version and threads."""
    threads = torch.get_num_threads()
    if threads not in _SIGNATURES:
        flags = ' '.join(f for f in _ISA_FLAGS if f in cpu_flags())
        _SIGNATURES[threads] = (f'{cpu_model()} [{flags or torch.backends.cpu.get_cpu_capability()}] '
                                f'torch {torch.__version__} {threads} threads')
    return _SIGNATURES[threads]


def _cache_file() -> Path:
    root = os.environ.get('MIXZOO_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'mixzoo')
    return Path(root) / 'cpu-choices.json'


def _read() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write(sig: str, name: str, entry: dict) -> None:
    """Merge one decision into the cache file (atomically: parallel test workers share it)."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read()
        data.setdefault(sig, {})[name] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix='.tmp')
        with os.fdopen(fd, 'w') as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass   # a read-only home: the decision holds for this process only


def _forced() -> Dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in os.environ.get(ENV, '').split(','))):
        name, _, option = item.partition(':')
        c = _CHOICES.get(name)
        if c is None or option not in c.options:
            known = '; '.join(f'{n}: {"|".join(x.options)}' for n, x in sorted(_CHOICES.items()))
            raise ValueError(f'{ENV}={os.environ[ENV]!r}: {item!r} is not <choice>:<option> with one of: {known}')
        out[name] = option
    return out


def _measure(c: Choice) -> dict:
    # (a first use inside an autocast region must not time the fp32 options in bf16: each measure sets its own)
    with torch.inference_mode(), torch.autocast('cpu', enabled=False):
        times = c.measure()
    if not times:
        return {'option': c.options[0], 'source': 'default (no option could be measured here)', 'ms': {}}
    best = min(times, key=times.get)
    default = next((o for o in c.options if o in times), best)
    # the first option stays unless another is clearly faster: a near tie would flip with the machine's load
    option = best if times[best] < (1 - _MARGIN) * times[default] else default
    return {'option': option, 'source': f'measured {time.strftime("%Y-%m-%d")}',
            'ms': {k: round(v * 1e3, 3) for k, v in sorted(times.items())}}


def decision(name: str, retune: bool = False) -> dict:
    """{'option', 'source', 'ms'} of choice ``name`` on this CPU (forced, cached, or measured now)."""
    sig = signature()
    key = (name, sig)
    if not retune and key in _DECIDED:
        return _DECIDED[key]
    option = _forced().get(name)
    if option is not None:
        entry = {'option': option, 'source': f'forced by {ENV}', 'ms': {}}
    else:
        entry = None if retune else _read().get(sig, {}).get(name)
        if entry is None or entry.get('option') not in _CHOICES[name].options:
            entry = _measure(_CHOICES[name])
            _write(sig, name, entry)
        else:
            entry = dict(entry, source=f'{entry["source"]}, cached in {_cache_file()}')
    _DECIDED[key] = entry
    return entry


def choice(name: str) -> str:
    """The option of choice ``name`` on this CPU (cheap after the first call in a process)."""
    entry = _DECIDED.get((name, signature()))
    return (entry or decision(name))['option']


def kernel_not_chosen(name: str) -> List[str]:
    """For a C-kernel op backend's ``auto_check``: [] where this CPU's choice ``name`` picked the kernel ('c'), else
    why the dispatcher does not take it by itself (forcing still runs it)."""
    d = decision(name)
    return [] if d['option'] == 'c' else [f'measured slower than the torch backend on this CPU ({d["source"]})']


def explain(name: str) -> str:
    """How choice ``name`` was decided here: its source and, where measured, each option's time."""
    d = decision(name)
    times = ', '.join(f'{k} {v} ms' for k, v in d['ms'].items())
    return f'{d["source"]}{"; " + times if times else ""}'


def retune() -> None:
    """Measure every choice again (``python -m mixzoo.ops info --retune``)."""
    for name in _CHOICES:
        decision(name, retune=True)


def interleaved(fns: Dict[str, Callable[[], object]], reps: int = 5, warmup: bool = True,
                sync: Optional[Callable[[], None]] = None,
                rounds: Optional[Dict[str, List[float]]] = None) -> Dict[str, float]:
    """Best-of-``reps`` seconds of each option, the options taking turns (a load change hits all alike), after one
    warm-up call each (``warmup``). ``sync`` (a device synchronisation) runs before the clock starts and after the
    call, before it stops: the call's queued device work is timed. Each round's seconds are appended to ``rounds``
    when given (tools/opbench.py times with this too)."""
    for fn in fns.values() if warmup else ():
        fn()
    best = {k: float('inf') for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            if sync is not None:
                sync()
            t = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            dt = time.perf_counter() - t
            best[k] = min(best[k], dt)
            if rounds is not None:
                rounds.setdefault(k, []).append(dt)
    return best
