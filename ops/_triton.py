"""What the ops' Triton kernels share; imported only by their ``triton.py`` modules (triton is optional)."""
import triton

from ._dispatch import triton_interpret


def autotune_configs(tiles):
    """Autotune configs of (BLOCK_M, BLOCK_N, num_warps, num_stages) tiles; under the interpreter (the CPU
    tests) one small tile, as it cannot autotune over several."""
    if triton_interpret():
        return [triton.Config({'BLOCK_M': 16, 'BLOCK_N': 16}, num_warps=1)]
    return [triton.Config({'BLOCK_M': bm, 'BLOCK_N': bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]
