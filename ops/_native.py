"""Small C kernels for CPU, compiled on first use and loaded through ctypes.

A kernel is one C file beside its op (e.g. ``ops/halo/halo_cpu.c``), plain C with GCC vector
extensions (the shared helpers in ``ops/_vec.h``) and OpenMP, no Python or torch headers: it compiles in
about a second, where a torch C++ extension needs minutes and a matching toolchain. The shared object is cached under
``$MIXZOO_CACHE/native`` (default ``~/.cache/mixzoo/native``), keyed on the source, the compiler,
its flags and the CPU (``-march=native``), so a new machine or an edited kernel rebuilds.
OpenMP: the object links ``libgomp.so.1`` by soname, which resolves to the runtime torch has
already loaded, so its threads and torch's are one pool.

``MIXZOO_NATIVE=0`` turns the kernels off (their backends then report why they cannot run);
``CC`` picks the compiler (default ``cc``).
"""
import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Dict, Optional, Union

from ._dispatch import tracing

__all__ = ['NativeUnavailable', 'backend_unavailable', 'load', 'strides', 'unavailable']

FLAGS = ['-O3', '-std=gnu11', '-ffp-contract=fast', '-fopenmp', '-fPIC', '-shared', '-Wno-psabi']
ARCH = ['-march=native']


class NativeUnavailable(RuntimeError):
    """A kernel cannot be built or loaded here; the message says why."""


_LOCK = threading.Lock()
_CACHE: Dict[str, Union[ctypes.CDLL, NativeUnavailable]] = {}


def _cache_dir() -> Path:
    root = os.environ.get('MIXZOO_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'mixzoo')
    return Path(root) / 'native'


def _cpu_id() -> str:
    """What -march=native depends on: the machine and its CPU's feature flags."""
    ident = platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'Features', 'model name')):
                    ident += line
    except OSError:
        ident += platform.processor()
    return ident


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _source(src: Path) -> bytes:
    """The kernel's text with the local headers it includes (``#include "../_vec.h"``): the cache key, so that
    editing a shared header rebuilds every kernel using it."""
    code = src.read_bytes()
    for name in re.findall(rb'^#include "([^"]+)"', code, re.M):
        code += b'\0' + (src.parent / name.decode()).read_bytes()
    return code


def _build(src: Path, native_arch: bool) -> Path:
    cc = os.environ.get('CC') or 'cc'
    if shutil.which(cc) is None:
        raise NativeUnavailable(f'no C compiler: {cc!r} not found on PATH (install gcc, or set CC)')
    try:
        version = _run([cc, '--version'], timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f'C compiler {cc!r} does not run: {e}') from None
    code = _source(src)
    errors = []
    for arch in ((ARCH, []) if native_arch else ([],)):   # -march=native where the compiler knows it
        flags = FLAGS + arch
        key = hashlib.sha256(b'\0'.join([code, version.encode(), ' '.join(flags).encode(),
                                         _cpu_id().encode()])).hexdigest()[:16]
        out = _cache_dir() / f'{src.stem}-{key}.so'
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix='.so', dir=out.parent)
        os.close(fd)
        try:
            res = _run([cc, *flags, str(src), '-o', tmp, '-lm'], timeout=300)
            if res.returncode == 0:
                os.replace(tmp, out)    # atomic: concurrent builders each publish a whole file
                return out
            errors.append(f'{" ".join([cc, *flags])}: {res.stdout.strip()[-1500:]}')
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise NativeUnavailable(f'compiling {src.name} failed:\n' + '\n'.join(errors))


def load(src: Union[str, Path], native_arch: bool = True) -> ctypes.CDLL:
    """The compiled library of C file ``src`` (built and cached on first call); raises
    :class:`NativeUnavailable` with the reason when it cannot be built or loaded. ``native_arch=False``
    builds for the compiler's default target (the tests check that portable code path too)."""
    if os.environ.get('MIXZOO_NATIVE', '1').strip() == '0':
        raise NativeUnavailable('native CPU kernels disabled by MIXZOO_NATIVE=0')
    src = Path(src)
    name = f'{src}:{native_arch}'   # no resolve(): a file-system call on every op call otherwise
    with _LOCK:
        if name not in _CACHE:
            import torch  # noqa: F401  -- torch's libgomp first, so the kernel shares its OpenMP runtime
            try:
                _CACHE[name] = ctypes.CDLL(str(_build(src, native_arch)))
            except NativeUnavailable as e:
                _CACHE[name] = e
            except OSError as e:
                _CACHE[name] = NativeUnavailable(f'loading the compiled {src.name} failed: {e}')
        lib = _CACHE[name]
    if isinstance(lib, NativeUnavailable):
        raise lib
    return lib


def unavailable(src: Union[str, Path]) -> Optional[str]:
    """Why the kernel of ``src`` cannot run here (None if it can); builds it on first call."""
    try:
        load(src)
        return None
    except NativeUnavailable as e:
        return str(e)


def backend_unavailable(src: Union[str, Path]) -> Optional[str]:
    """:func:`unavailable` for a dispatcher backend's ``available`` check, which is also asked inside traced calls:
    there the tracing is the reason, given before the file system is reached (under torch.compile a graph break)."""
    if tracing():
        return 'inside torch.compile / export / FX or TorchScript tracing (an opaque C call on raw data)'
    return unavailable(src)


def strides(t, n: Optional[int] = None) -> ctypes.Array:
    """``t``'s strides in elements as the C ``long`` array the kernels take (``n`` zeros for ``t`` None)."""
    values = t.stride() if t is not None else (0,) * n
    return (ctypes.c_long * len(values))(*values)
