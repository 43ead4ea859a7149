"""The zoo package for the tools (``from _zoo import mixzoo``), with an error that says how to get it.

The tools run from a checkout; ``mixzoo`` is that checkout installed (``pip install -e .`` maps backbones/
and ops/ into the namespace), which ``bash tools/env.sh python tools/<tool>.py`` does once per machine."""
import sys

try:
    import mixzoo  # noqa: F401  (registers every mz_* model in timm)
except ModuleNotFoundError as e:
    if e.name != 'mixzoo':
        raise
    raise SystemExit(f'mixzoo is not installed in this Python ({sys.executable}): run `pip install -e .` in the '
                     f'repository root, or run the tool as `bash tools/env.sh python tools/<tool>.py ...`') from None
