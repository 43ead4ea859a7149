"""What a timing on this machine depends on, for the header of every benchmark table: CPU model and the
vector kernels torch dispatches to, cores and load, torch threads, the memory allocator, versions.
Speed ratios differ between CPU vendors (MKL's fp32 paths on AMD, AVX-512 vs AVX2) and with the
allocator (fresh large CPU tensors page-fault under glibc's default malloc), so every figure needs them."""
import os
import platform
import re
from typing import List

import torch

# allocators a user preloads instead of glibc's malloc (LD_PRELOAD), by library name
_ALLOCATORS = ('jemalloc', 'tcmalloc', 'mimalloc')
# environment variables that tune one of them (glibc's mallopt variables end in an underscore)
_ALLOCATOR_ENV = re.compile(r'^(MALLOC_CONF|_RJEM_MALLOC_CONF|JE_MALLOC_CONF|TCMALLOC_\w+|MIMALLOC_\w+|'
                            r'MALLOC_\w+_|GLIBC_TUNABLES|PYTORCH_CPU_ALLOCATOR\w*)$')


def cpu_model() -> str:
    """'AMD EPYC 7B13', 'Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz', ... (the reader the zoo's per-CPU choices
    key on; imported here, not at the top: tools/official_bench.py imports the official code before the zoo)."""
    from mixzoo.ops._cpu import cpu_model as model
    return model()


def cpu_flags() -> set:
    """The CPU's feature flags ('avx512_bf16', 'amx_bf16', ...; Linux /proc/cpuinfo, empty elsewhere)."""
    from mixzoo.ops._cpu import cpu_flags as flags
    return flags()


def allocator() -> str:
    """The malloc behind torch's CPU tensors: a preloaded jemalloc / tcmalloc / mimalloc (LD_PRELOAD or mapped
    into this process) or glibc's, with whatever environment variables tune it."""
    mapped = set()
    try:
        with open('/proc/self/maps') as f:
            mapped = {name for line in f for name in _ALLOCATORS if f'lib{name}' in line}
    except OSError:
        pass
    preload = os.environ.get('LD_PRELOAD', '')
    names = sorted(mapped | {name for name in _ALLOCATORS if name in preload})
    env = ' '.join(f'{k}={v}' for k, v in sorted(os.environ.items()) if _ALLOCATOR_ENV.match(k))
    base = ' + '.join(names) if names else 'glibc malloc'
    if preload:
        base += f' (LD_PRELOAD={preload})'
    if not names and not env:
        return 'glibc malloc (default)'
    return f'{base}, {env}' if env else base


def load(cores) -> str:
    """The 1- and 5-minute load averages; on a machine busier than half its cores, a warning."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return 'load unknown'
    busy = '; a loaded machine: compare ratios within one run' if cores and one > 0.5 * cores else ''
    return f'load {one:.1f} / {five:.1f} (1 / 5 min){busy}'


def isa() -> str:
    """The vector instruction set torch's CPU kernels dispatch to here ('AVX-512', 'AVX2', ...)."""
    cap = torch.backends.cpu.get_cpu_capability()
    return {'AVX512': 'AVX-512', 'DEFAULT': f'{platform.machine()} default kernels'}.get(cap, cap)


def machine_key(device: str = 'cpu') -> str:
    """What a benchmark figure is kept under: the CPU model and the vector ISA torch uses on it
    ('AMD EPYC 7B13, AVX-512'), or the GPU for a CUDA run."""
    if str(device).startswith('cuda') and torch.cuda.is_available():
        return f'{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}'
    model = re.sub(r'\((R|TM|tm)\)', '', cpu_model())
    return f'{" ".join(model.split())}, {isa()}'


def describe(device: str = 'cpu') -> List[str]:
    """Header lines: the machine, the software, and (for CUDA) the GPU."""
    import timm
    cores = os.cpu_count()
    lines = [f'CPU: {cpu_model()} ({platform.machine()}, torch kernels {torch.backends.cpu.get_cpu_capability()}), '
             f'{cores} cores, {load(cores)}',
             f'torch {torch.__version__} ({torch.get_num_threads()} threads, {torch.get_num_interop_threads()} '
             f'inter-op), timm {timm.__version__}, allocator: {allocator()}']
    if str(device).startswith('cuda') and torch.cuda.is_available():
        lines.append(f'GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})')
    return lines
