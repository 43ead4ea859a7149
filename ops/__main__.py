"""``python -m mixzoo.ops info``: every op x backend, what it supports, and whether it can run here; and the state of
the oneDNN linear route (``ops._onednn``), the second switch of what a model runs."""
import argparse
import sys

import torch

from . import _dispatch, _onednn


def info(out=None) -> None:
    out = out or sys.stdout   # (looked up per call: a default bound at import would outlive a redirection)
    probes = [('cpu', torch.float32)]
    if torch.cuda.is_available():
        probes += [('cuda', torch.float16)]
    print(f'torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}; '
          f'TRITON_INTERPRET={int(_dispatch.triton_interpret())}; '
          f'MIXZOO_BACKEND={__import__("os").environ.get("MIXZOO_BACKEND", "") or "(unset)"}', file=out)
    print(f'oneDNN linear (mixzoo.ops._onednn.linear): {_onednn.state()[1]}', file=out)
    for op in _dispatch.ops():
        print(f'\n[{op}]  priority: {" > ".join(b.name for b in _dispatch.backends(op))}', file=out)
        for b in _dispatch.backends(op):
            print(f'  {b.name:10s} {b.describe()}', file=out)
            if b.doc:
                print(f'  {"":10s} {b.doc}', file=out)
            for dev, dt in probes:
                call = _dispatch.Call(dev, dt)
                auto, forced = b.reasons(call), b.reasons(call, forced=True)
                if not auto:
                    state = 'usable (auto)'
                elif not forced:
                    state = 'usable when forced; not picked automatically: ' + '; '.join(auto)
                else:
                    state = 'NOT usable: ' + '; '.join(forced)
                print(f'  {"":10s} here, {dev}/{str(dt).replace("torch.", "")}: {state}', file=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python -m mixzoo.ops')
    p.add_argument('command', choices=['info'], nargs='?', default='info')
    p.parse_args(argv)
    info()
    return 0


if __name__ == '__main__':
    sys.exit(main())
