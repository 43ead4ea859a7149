"""Checkpoint key renames as a declarative, two-way table.

A family whose release layout differs from the zoo's by names only declares its renames as pairs of
templates, ``Rename(official, zoo)``; the loader reads them one way (official -> zoo) and tests read
them the other way (zoo -> official) to write release-layout files, so no test restates a filter.

Templates are literal text with integer fields: ``{s}``, ``{s+1}``, ``{2*s-1}`` (one letter, an
optional factor and offset). ``patch_embed{s+1}.`` <-> ``stages.{s}.downsample.`` maps
``patch_embed2.x`` to ``stages.1.downsample.x`` and back; a field that would be negative or not an
integer on the other side does not match. A template that starts with ``.`` is an infix (replaced
wherever it stands, ending at a ``.`` or the key's end); any other is a prefix of the key. For each key
the first prefix rule that matches applies, then every infix rule; ``scope`` (a regex the key must
match, in the layout it is read from) limits a rule to part of the model.
"""
import re
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Tuple

_FIELD = re.compile(r'\{(?:(\d+)\*)?([a-z])([+-]\d+)?\}')


class _Template:
    def __init__(self, text: str):
        self.text = text
        self.infix = text.startswith('.')
        self.fields = []            # (letter, factor, offset) in order
        pattern, pos = [], 0
        for m in _FIELD.finditer(text):
            pattern.append(re.escape(text[pos:m.start()]) + r'(\d+)')
            self.fields.append((m[2], int(m[1] or 1), int(m[3] or 0)))
            pos = m.end()
        pattern.append(re.escape(text[pos:]))
        body = ''.join(pattern) + ('' if text.endswith('.') else r'(?=\.|$)')
        self.regex = re.compile(body if self.infix else '^' + body)

    def values(self, m: re.Match) -> Optional[Dict[str, int]]:
        """The fields' values behind a match (None where they are inconsistent)."""
        out = {}
        for (letter, k, b), raw in zip(self.fields, m.groups()):
            n = int(raw) - b
            if n < 0 or n % k or out.get(letter, n // k) != n // k:
                return None
            out[letter] = n // k
        return out

    def format(self, values: Dict[str, int]) -> Optional[str]:
        parts = iter(self.fields)

        def field(_):
            letter, k, b = next(parts)
            return str(k * values[letter] + b)
        text = _FIELD.sub(field, self.text)
        return None if any(k * values[c] + b < 0 for c, k, b in self.fields) else text


@dataclass(frozen=True)
class Rename:
    official: str
    zoo: str
    scope: Optional[str] = None

    def sides(self, to_zoo: bool) -> Tuple[_Template, _Template]:
        a, b = _Template(self.official), _Template(self.zoo)
        return (a, b) if to_zoo else (b, a)


class Renames:
    """An ordered table of ``Rename`` rules, read in either direction."""

    def __init__(self, rules: Iterable[Rename]):
        self.rules = tuple(rules)
        self._compiled = {d: [(r.sides(d), re.compile(r.scope) if r.scope else None) for r in self.rules]
                          for d in (True, False)}
        for (src, dst), _ in self._compiled[True]:
            if src.infix != dst.infix or {f[0] for f in src.fields} != {f[0] for f in dst.fields}:
                raise ValueError(f'rename {src.text!r} <-> {dst.text!r}: both sides must be prefixes or both '
                                 f'infixes, with the same fields')

    def key(self, key: str, to_zoo: bool = True) -> str:
        out, done_prefix = key, False
        for (src, dst), scope in self._compiled[to_zoo]:
            if scope is not None and not scope.search(key):
                continue
            if not src.infix:
                if done_prefix:
                    continue
                m = src.regex.match(out)
                vals = m and src.values(m)
                new = dst.format(vals) if vals is not None and m else None
                if new is not None:
                    out, done_prefix = new + out[m.end():], True
                continue

            def sub(m, src=src, dst=dst):
                vals = src.values(m)
                new = dst.format(vals) if vals is not None else None
                return m[0] if new is None else new
            out = src.regex.sub(sub, out)
        return out

    def to_zoo(self, state_dict: Mapping) -> Dict:
        return {self.key(k, True): v for k, v in state_dict.items()}

    def to_official(self, state_dict: Mapping) -> Dict:
        return {self.key(k, False): v for k, v in state_dict.items()}
