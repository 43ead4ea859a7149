"""Parameter and multiply-accumulate counts, the way the zoo compares them with published figures:
GMACs = torch.utils.flop_counter total / 2 for one image, in eval mode (REFERENCE.md's convention)."""
import torch
import torch.nn as nn


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gmacs(model: nn.Module, size, by_op: bool = False):
    """GMACs of one forward of a (1, 3, *size) input on the model's device (the meta device works);
    with ``by_op`` also a {aten op name: GMACs} breakdown."""
    from torch.utils.flop_counter import FlopCounterMode
    p = next(model.parameters())
    x = torch.empty((1, 3) + tuple(size), device=p.device, dtype=p.dtype)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eval()(x)
    total = fc.get_total_flops() / 2e9
    if not by_op:
        return total
    return total, {str(k).split('.')[-1]: v / 2e9 for k, v in fc.get_flop_counts()['Global'].items()}
