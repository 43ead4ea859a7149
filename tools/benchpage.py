"""The benchmark's tables and its page (BENCHMARKS.md).

A table is a list of `Column`s (name, legend line, number format) and rows (dicts keyed by column name;
a missing or None value prints as `-`). `table()` pads the columns so the Markdown reads as a table in a
terminal too; `legend()` explains every column shown. New measurements (more columns) add a `Column`
and fill its key in the rows; nothing else changes.

The page is Markdown in sections, each opened by a marker line ``<!-- section: KEY -->`` and ending at the
next marker (or the end of the page). `update_page()` replaces the section with its key, or adds it before
the first historic one (keys starting with ``earlier:``, written by hand and never rewritten), and keeps
every other section and the text above the first marker as they are.
"""
import os
import re
import textwrap
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

MARKER = '<!-- section: {} -->'
_MARKER_RE = re.compile(r'^<!-- section: (.+?) -->$', re.M)
HISTORIC = 'earlier:'


@dataclass(frozen=True)
class Column:
    name: str
    legend: str = ''
    fmt: str = ''              # format spec for numbers ('' = str()); text columns are left-aligned
    width: int = 0             # width to pad to while rows stream in (before every value is known)

    def cell(self, value) -> str:
        if value is None:
            return '-'
        if isinstance(value, float) and self.fmt:
            return format(value, self.fmt)
        return str(value)


def _numeric(col: Column) -> bool:
    return bool(col.fmt)


def _line(cols: Sequence[Column], cells: Sequence[str], widths: Sequence[int]) -> str:
    parts = [c.rjust(w) if _numeric(col) else c.ljust(w) for col, c, w in zip(cols, cells, widths)]
    return '| ' + ' | '.join(parts) + ' |'


def widths(cols: Sequence[Column], rows: Iterable[Dict] = ()) -> List[int]:
    """Each column as wide as its header, its width hint and every value in `rows` (at least 3: `---`)."""
    w = [max(3, len(c.name), c.width) for c in cols]
    for r in rows:
        w = [max(wi, len(c.cell(r.get(c.name)))) for wi, c in zip(w, cols)]
    return w


def header(cols: Sequence[Column], w: Sequence[int]) -> List[str]:
    """The header line and Markdown's separator line (numbers right-aligned: `---:`)."""
    sep = '|' + '|'.join(('-' * (wi + 1) + ':') if _numeric(c) else ('-' * (wi + 2)) for c, wi in zip(cols, w)) + '|'
    return [_line(cols, [c.name for c in cols], w), sep]


def row(cols: Sequence[Column], r: Dict, w: Sequence[int]) -> str:
    return _line(cols, [c.cell(r.get(c.name)) for c in cols], w)


def table(cols: Sequence[Column], rows: Sequence[Dict]) -> List[str]:
    w = widths(cols, rows)
    return header(cols, w) + [row(cols, r, w) for r in rows]


def cells(line: str) -> List[str]:
    """The cells of one table line (the inverse of `row`, for readers of the printed table)."""
    return [c.strip() for c in line.strip().strip('|').split('|')]


def legend(cols: Sequence[Column], notes: Sequence[str] = (), width: int = 110) -> List[str]:
    """One Markdown list item per column with a legend, then the notes (e.g. what `-` means), wrapped at
    `width` (continuation lines indented, so still one item each)."""
    items = [f'- `{c.name}`: {c.legend}' for c in cols if c.legend] + [f'- {n}' for n in notes]
    return [ln for it in items for ln in textwrap.wrap(it, width, subsequent_indent='  ', break_on_hyphens=False,
                                                        break_long_words=False)]


# ---- the page ----

def split_page(text: str) -> Tuple[str, List[Tuple[str, str]]]:
    """(the text above the first section, [(key, the section's text including its marker line)])."""
    marks = list(_MARKER_RE.finditer(text))
    if not marks:
        return text, []
    preamble = text[:marks[0].start()]
    sections = []
    for m, nxt in zip(marks, marks[1:] + [None]):
        sections.append((m.group(1), text[m.start():nxt.start() if nxt else len(text)]))
    return preamble, sections


def section(key: str, body: str) -> str:
    return f'{MARKER.format(key)}\n{body.strip()}\n\n'


def update_page(path: str, key: str, body: str, preamble: str) -> str:
    """Write `body` as the section `key` of the page at `path` (created with `preamble` if absent): the
    section of that key is replaced in place, a new key goes after the benchmark's other sections and
    before the historic ones. Returns 'replaced' or 'added'."""
    if key.startswith(HISTORIC):
        raise ValueError(f'{key!r}: sections starting with {HISTORIC!r} are historic and never rewritten')
    text = open(path, encoding='utf-8').read() if os.path.exists(path) else preamble
    pre, sections = split_page(text)
    new = section(key, body)
    keys = [k for k, _ in sections]
    if key in keys:
        sections[keys.index(key)] = (key, new)
        what = 'replaced'
    else:
        at = next((i for i, k in enumerate(keys) if k.startswith(HISTORIC)), len(sections))
        sections.insert(at, (key, new))
        what = 'added'
    if pre and not pre.endswith('\n\n'):
        pre = pre.rstrip('\n') + '\n\n'
    out = pre + ''.join(s if s.endswith('\n\n') else s.rstrip('\n') + '\n\n' for _, s in sections)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(out.rstrip('\n') + '\n')
    os.replace(tmp, path)
    return what


def section_keys(path: str) -> List[str]:
    if not os.path.exists(path):
        return []
    return [k for k, _ in split_page(open(path, encoding='utf-8').read())[1]]


def find_section(path: str, key: str) -> Optional[str]:
    if not os.path.exists(path):
        return None
    return dict(split_page(open(path, encoding='utf-8').read())[1]).get(key)
