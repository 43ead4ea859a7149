"""What the ops' Triton kernels share; imported only by their ``triton.py`` modules (triton is optional).

Launch tiles. A kernel's launch configurations are :class:`Tile` lists: block sizes, warps, pipeline stages, and
the largest head-dim block (``BLOCK_D``, the padded head dim) the tile fits in shared memory with 4-byte and with
2-byte elements on sm_80 (163 KB a block) and sm_90 (227 KB). An autotuned kernel tries every tile of its list
that fits (:func:`autotune` prunes the others before any is compiled); a kernel with a fixed tile takes the first
of its list that fits (:func:`pick`). The bounds are what ``python -m mixzoo.ops info --gpu-compile`` measured
(compiled ahead of time for sm_80 / sm_90 at the models' head dims and the backend's declared maximum, CI's
tests/test_gpu_compile.py): a bound is always one of those compiled head dims, so every tile a launch can take
was compiled at its largest admitted ``BLOCK_D``. Under the interpreter (the CPU tests) one small tile.
"""
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch
import triton

from ._dispatch import triton_interpret

ANY = 1 << 30   # no bound: the backend's declared head dims


@dataclass(frozen=True)
class Tile:
    """Block sizes (constexpr name, value), warps and pipeline stages of a launch, admitted while the kernel's
    ``BLOCK_D`` <= ``max_d[0]`` at 4-byte elements, ``max_d[1]`` at 2-byte ones."""
    blocks: Tuple[Tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 3
    max_d: Tuple[int, int] = (ANY, ANY)

    def fits(self, block_d: int, dtype: torch.dtype) -> bool:
        return block_d <= self.max_d[0 if dtype.itemsize >= 4 else 1]

    def kwargs(self) -> Dict[str, int]:
        return dict(self.blocks, num_warps=self.num_warps, num_stages=self.num_stages)


def tile(num_warps: int = 4, num_stages: int = 3, max_d: Tuple[int, int] = (ANY, ANY), **blocks: int) -> Tile:
    return Tile(tuple(blocks.items()), num_warps, num_stages, max_d)


def _interpreted(tiles: Sequence[Tile]) -> Tile:
    """The interpreter's tile: 16 for every block size (the smallest tl.dot takes), one warp."""
    return Tile(tuple((name, 16) for name, _ in tiles[0].blocks), num_warps=1, num_stages=1)


def pick(tiles: Sequence[Tile], block_d: int, dtype: torch.dtype) -> Dict[str, int]:
    """Launch keywords (block sizes, num_warps, num_stages) of the first tile of ``tiles`` that fits."""
    if triton_interpret():
        return _interpreted(tiles).kwargs()
    for t in tiles:
        if t.fits(block_d, dtype):
            return t.kwargs()
    raise ValueError(f'no launch tile fits BLOCK_D={block_d} at {dtype} (the backend declares larger head dims '
                     f'than its tiles were compiled for)')


def configs(tiles: Sequence[Tile]) -> list:
    """The autotune configs of ``tiles`` (the GPU list; one small tile under the interpreter, which cannot
    autotune over several)."""
    if triton_interpret():
        return [triton.Config(dict(t.blocks), num_warps=t.num_warps, num_stages=t.num_stages)
                for t in [_interpreted(tiles)]]
    return [triton.Config(dict(t.blocks), num_warps=t.num_warps, num_stages=t.num_stages) for t in tiles]


def autotune(tiles: Sequence[Tile], key: Sequence[str]):
    """``triton.autotune`` over ``tiles`` (their configs), pruning those that do not fit the call's ``BLOCK_D``
    (or ``BLOCK_DV`` where larger) at the dtype of the kernel's first tensor argument, before any is compiled or timed."""
    cfgs = configs(tiles)
    tile_of = dict(zip(map(id, cfgs), tiles))

    def prune(candidates, named_args, **kwargs):
        block_d = max(v for k, v in {**named_args, **kwargs}.items() if k in ('BLOCK_D', 'BLOCK_DV'))
        dtype = next(v.dtype for v in named_args.values() if isinstance(v, torch.Tensor))
        keep = [c for c in candidates if tile_of[id(c)].fits(block_d, dtype)]
        if not keep:
            raise ValueError(f'no autotune config fits BLOCK_D={block_d} at {dtype}')
        return keep
    return triton.autotune(configs=cfgs, key=list(key), prune_configs_by={'early_config_prune': prune})
