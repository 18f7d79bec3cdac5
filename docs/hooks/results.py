"""MkDocs hook: the figures and tables the pages show come from the measured results.

- A page that links `figures/NAME.png` (any depth: `../figures/NAME.png`) gets the file
  of that name found under `benchmarks/results/` or `research/` (any sub-folder: results
  move between studies, their names stay), copied into the site at build time.
- A line `<!-- result: NAME.md -->` is replaced by that results page's text (found the
  same way), its headings moved two levels down and its lines indented like the marker,
  so it can sit inside an admonition.

A name found nowhere stops the build (with `--strict` and without).
"""
from __future__ import annotations

from pathlib import Path
import re

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
SEARCHED = ("benchmarks/results", "research")
FIGURE = re.compile(r"\bfigures/([\w.\-]+\.png)\b")
RESULT = re.compile(r"^(?P<indent>[ \t]*)<!-- result: (?P<name>[\w.\-]+\.md) -->[ \t]*$", re.M)


def find_result(name: str) -> Path:
    """The file called `name` under benchmarks/results/ or research/."""
    for base in SEARCHED:
        hits = sorted((ROOT / base).rglob(name)) if (ROOT / base).is_dir() else []
        if hits:
            return hits[0]
    raise PluginError(f"{name} is in no folder under {' or '.join(SEARCHED)}")


def on_files(files, config):
    names = set()
    for f in files.documentation_pages():
        names |= set(FIGURE.findall(Path(f.abs_src_path).read_text(encoding="utf-8")))
    for name in sorted(names):
        files.append(File.generated(config, f"figures/{name}", abs_src_path=str(find_result(name))))
    return files


def _embed(match: re.Match) -> str:
    text = find_result(match["name"]).read_text(encoding="utf-8")
    text = re.sub(r"^(#{1,4}) ", r"\1## ", text, flags=re.M)
    return "\n".join(match["indent"] + line if line else "" for line in text.splitlines())


def on_page_markdown(markdown, page, config, files):
    return RESULT.sub(_embed, markdown)
