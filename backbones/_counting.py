"""Parameter and multiply-accumulate counts, the way the zoo compares them with published figures:
GMACs = torch.utils.flop_counter total / 2 for one image, in eval mode (REFERENCE.md's convention)."""
import torch
import torch.nn as nn

from .layers import padded_same
from .ops import _onednn
from .ops._dispatch import forcing


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gmacs(model: nn.Module, size, by_op: bool = False):
    """GMACs of one forward of a (1, 3, *size) input on the model's device (the meta device works);
    with ``by_op`` also a {aten op name: GMACs} breakdown."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop
    p = next(model.parameters())
    x = torch.empty((1, 3) + tuple(size), device=p.device, dtype=p.dtype)
    # torch's counter has no formula for the CPU flash-attention kernel that SDPA runs on CPU (it
    # would count 0): give it the generic SDPA one
    extra = {}
    cpu_flash = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)
    if cpu_flash is not None:
        extra[cpu_flash] = getattr(sdpa_flop, '__wrapped__', sdpa_flop)   # FlopCounterMode adds the shape wrapper
    # counted as the architecture is defined: linear layers as linear (not their oneDNN conv route) and
    # halo attention over whole windows (its fast path skips the zero keys outside the map), neighborhood attention
    # over its windows (its fast path multiplies whole key regions), TF-'same' depthwise filters as defined (not with
    # the zero row / column their inference path adds in place of a padded map)
    with FlopCounterMode(display=False, custom_mapping=extra) as fc, torch.no_grad(), _onednn.disabled(), \
            forcing(halo='reference', neighborhood='reference'), padded_same():
        model.eval()(x)
    total = fc.get_total_flops() / 2e9
    if not by_op:
        return total
    return total, {str(k).split('.')[-1]: v / 2e9 for k, v in fc.get_flop_counts()['Global'].items()}
