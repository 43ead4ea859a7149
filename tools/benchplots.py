"""The benchmark's two plots, drawn beside its page where matplotlib is installed (an optional extra,
``pip install "mixzoo[plots]"``): images per second against GMACs for every timed model beside its reference,
and the peak memory of one forward against the input side for the official-reference families beside the
official models.

The data preparation (`speed_points`, `memory_lines`) needs no matplotlib. Drawing uses matplotlib's object
API (a `Figure` saved through the Agg canvas), so importing this module or drawing chooses no backend for the
process that runs it.
"""
import os
from typing import Callable, Dict, List, Sequence, Tuple

INSTALL = 'pip install "mixzoo[plots]"'
MARKERS = 'os^Dvp*hX<>'


class PlotsUnavailable(RuntimeError):
    """matplotlib is missing; the message says how to install it."""


def memory_key(side: int) -> str:
    """The memory table's column (and row key) for one input side."""
    return f'MB@{side}'


def speed_points(rows: Sequence[Dict], family_of: Callable[[str], str]) -> Dict[str, List[Tuple]]:
    """{family: [(model, GMACs, img/s, reference img/s or None)]} of the timed rows, in row order."""
    out = {}
    for r in rows:
        if r.get('img/s') and r.get('GMACs'):
            out.setdefault(family_of(r['model']), []).append((r['model'], r['GMACs'], r['img/s'], r.get('ref_img/s')))
    return out


def memory_lines(rows: Sequence[Dict], sides: Sequence[int]) -> Dict[Tuple[str, str], List[Tuple[int, float]]]:
    """{(model, implementation): [(side, MB)]} of the memory table's rows, the measured sides only."""
    lines = {}
    for r in rows:
        pts = [(s, r[memory_key(s)]) for s in sides if r.get(memory_key(s)) is not None]
        if pts:
            lines[(r['model'], r['implementation'])] = pts
    return lines


def _figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable(f'the plots need matplotlib: {INSTALL}') from None
    fig = Figure(figsize=(8, 5.5), layout='constrained')
    return fig, fig.add_subplot()


def _plain_ticks(*axes):
    """Log axes labelled 0.05, 0.1, 20, 100 rather than 5x10^-2 (the 1, 2, 5 of each decade only: they crowd)."""
    from matplotlib.ticker import FuncFormatter
    fmt = FuncFormatter(lambda v, _: f'{v:g}' if f'{v:.0e}'[0] in '125' else '')
    for axis in axes:
        axis.set_major_formatter(fmt)
        axis.set_minor_formatter(fmt)


def _colors(n):
    from matplotlib import colormaps
    cmap = colormaps['tab10']
    return [cmap(i % 10) for i in range(n)]


def speed_plot(points: Dict[str, List[Tuple]], path: str, title: str, ylabel: str) -> str:
    """Each zoo model (filled marker, one per family) joined by a dashed line to its reference (hollow)."""
    fig, ax = _figure()
    for (fam, pts), color, marker in zip(points.items(), _colors(len(points)), MARKERS * 3):
        for model, g, ips, ref in pts:
            if ref:
                ax.plot([g, g], [ips, ref], '--', color=color, lw=0.8)
                ax.scatter([g], [ref], marker=marker, facecolors='none', edgecolors=color)
            ax.annotate(model.removeprefix('mz_'), (g, ips), fontsize=6, xytext=(3, 3), textcoords='offset points')
        ax.scatter([p[1] for p in pts], [p[2] for p in pts], marker=marker, color=color, label=fam)
    ax.set(xscale='log', yscale='log', xlabel='GMACs per image (the zoo\'s count)', ylabel=ylabel,
           title=f'{title}\nfilled: zoo, hollow: its reference (dashed line joins the two)')
    _plain_ticks(ax.xaxis, ax.yaxis)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path


def memory_plot(lines: Dict[Tuple[str, str], List[Tuple[int, float]]], path: str, title: str) -> str:
    """Peak MB against the input side: the zoo's line solid, the official model's dashed, one color a model."""
    fig, ax = _figure()
    models = list(dict.fromkeys(m for m, _ in lines))
    color = dict(zip(models, _colors(len(models))))
    for (model, impl), pts in lines.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], '-o' if impl == 'zoo' else '--s', color=color[model],
                label=f'{model.removeprefix("mz_")} ({impl})', ms=4)
    ax.set(yscale='log', xlabel='input side (px), batch 1', ylabel='peak memory of one forward (MB)',
           title=f'{title}\nsolid: zoo, dashed: the official model')
    ax.set_xticks(sorted({p[0] for pts in lines.values() for p in pts}))
    _plain_ticks(ax.yaxis)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path


def draw(folder: str, stem: str, title: str, points: Dict, lines: Dict, ylabel: str) -> List[str]:
    """`<folder>/<stem>-speed.png` (when any model was timed) and `<stem>-memory.png` (when memory was
    measured); the paths written. Raises PlotsUnavailable without matplotlib."""
    _figure()   # fails first, before any folder is made, where matplotlib is missing
    os.makedirs(folder, exist_ok=True)
    out = []
    if points:
        out.append(speed_plot(points, os.path.join(folder, f'{stem}-speed.png'), title, ylabel))
    if lines:
        out.append(memory_plot(lines, os.path.join(folder, f'{stem}-memory.png'), title))
    return out
