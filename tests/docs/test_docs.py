"""The manual is checked like code.

- `mkdocs build --strict` passes (skipped only where the `docs` extra is absent; CI installs
  it), and the generated CLI reference lists every option of every command.
- Every fenced ``` bash block of docs/**/*.md and README.md runs: the blocks of one page in
  order, in one fresh temporary directory per page (the cwd, also HOME, so packs land there),
  with `edgetrain` on PATH and proxies pointing nowhere (no network). A block whose first
  line is `# not run: <reason>` is skipped. A ``` text block right after a bash block shows
  its output: every non-empty line of it, except `...` lines (elisions), must appear in the
  command's stdout + stderr. A page holding the line `<!-- docs-test: slow -->` runs under
  the `slow` marker.
- README.md is a landing page: at most 12,000 characters, the two commands, the headline
  figure; the run-directory contract names every file of a finished run.
"""
from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
NOT_RUN = "# not run:"
SLOW = "<!-- docs-test: slow -->"
TEST_COMMAND = ('pip install torch==2.14.1 torchvision==0.29.1 && pip install -e ".[test]" '
                '&& python -m pytest')
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ ]*$",
                   re.M | re.S)


@dataclass
class Block:
    """One ``` bash block of a page: its code, the output shown after it, its line."""
    code: str
    line: int
    shown: list[str] | None = None

    @property
    def skip_reason(self) -> str | None:
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        return first[len(NOT_RUN):].strip() if first.startswith(NOT_RUN) else None


def page_blocks(text: str) -> list[Block]:
    """The bash blocks of a page, in order, each with the ``` text block right after it."""
    blocks: list[Block] = []
    last_end, last_bash = -1, False
    for m in FENCE.finditer(text):
        body = textwrap.dedent(m["body"])
        adjacent = last_bash and text[last_end:m.start()].strip() == ""
        if m["lang"] == "bash":
            blocks.append(Block(body, text.count("\n", 0, m.start()) + 1))
        elif m["lang"] == "text" and adjacent:
            blocks[-1].shown = body.splitlines()
        last_end, last_bash = m.end(), m["lang"] == "bash"
    return blocks


def missing_lines(shown: list[str], output: str) -> list[str]:
    """The shown lines (neither blank nor `...`) that the output does not contain."""
    out = [line.rstrip() for line in output.splitlines()]
    want = [s.strip() for s in shown if s.strip() and s.strip() != "..."]
    return [w for w in want if not any(w in line for line in out)]


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts) + [README]


def page_params():
    for p in pages():
        slow = SLOW in p.read_text(encoding="utf-8")
        yield pytest.param(p, id=str(p.relative_to(ROOT)),
                           marks=[pytest.mark.slow] if slow else [])


def page_env(home: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["HOME"] = str(home)  # ~/.cache/edgetrain/data: inside the page's directory
    env.setdefault("OMP_NUM_THREADS", "1")
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[k] = "http://127.0.0.1:9"  # no network: a download fails at once
    env["NO_COLOR"] = "1"
    return env


# --------------------------------------------------------------------------- the convention
SAMPLE = """
```bash
echo one
```

```text
one
```

```bash
# not run: needs a GPU
nvidia-smi
```
```text
never checked
```

    ```bash
    echo indented
    ```
"""


def test_page_blocks_follow_the_convention():
    blocks = page_blocks(SAMPLE)
    assert [b.code for b in blocks] == ["echo one\n", "# not run: needs a GPU\nnvidia-smi\n",
                                        "echo indented\n"]
    assert [b.skip_reason for b in blocks] == [None, "needs a GPU", None]
    assert blocks[0].shown == ["one"] and blocks[2].shown is None


def test_missing_lines_elides_dots_and_catches_a_wrong_line():
    out = "depth  val_acc\n    1   0.9722\nbest depth 1: test accuracy 0.95\n"
    assert missing_lines(["depth  val_acc", "...", "", "best depth 1:"], out) == []
    assert missing_lines(["best depth 2:"], out) == ["best depth 2:"]


# --------------------------------------------------------------------------- every page
@pytest.mark.parametrize("page", page_params())
def test_page_commands_run(page, tmp_path):
    """Every bash block of the page runs, in order, in one fresh directory; shown output holds."""
    if shutil.which("edgetrain") is None:
        pytest.skip("the edgetrain console script is not installed")
    env = page_env(tmp_path)
    for b in page_blocks(page.read_text(encoding="utf-8")):
        if b.skip_reason is not None:
            continue
        r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", b.code], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=1800)
        where = f"{page.relative_to(ROOT)}:{b.line}"
        assert r.returncode == 0, f"{where} exited {r.returncode}:\n{(r.stdout + r.stderr)[-4000:]}"
        if b.shown is not None:
            missing = missing_lines(b.shown, r.stdout + r.stderr)
            assert missing == [], f"{where}: output lacks {missing}:\n{(r.stdout + r.stderr)[-4000:]}"


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [str(p.relative_to(DOCS)) for p in pages()[:-1] if str(p.relative_to(DOCS)) not in nav]
    assert missing == []


# --------------------------------------------------------------------------- the site
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for mod in ("mkdocs", "material", "mkdocs_click", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(mod, reason="the docs extra: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_mkdocs_build_strict_passes(site):
    assert (site / "index.html").is_file() and (site / "reference" / "cli" / "index.html").is_file()


def commands(group, prefix="edgetrain"):
    """(html id, command) of every command of the click group, nested groups included."""
    import click
    yield prefix, group
    for name, cmd in getattr(group, "commands", {}).items():
        if isinstance(cmd, click.Group):
            yield from commands(cmd, f"{prefix}-{name}")
        else:
            yield f"{prefix}-{name}", cmd


def section(html: str, anchor: str) -> str:
    start = html.index(f'id="{anchor}"')
    nxt = re.compile(r"<h[1-6] id=").search(html, start + 1)
    return html[start:nxt.start() if nxt else len(html)]


def test_cli_reference_lists_every_option_of_every_command(site):
    import click
    from edgetrain.cli import cli
    html = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    missing = []
    for anchor, cmd in commands(cli):
        text = section(html, anchor)
        for p in cmd.params:
            if isinstance(p, click.Option):
                missing += [f"{anchor} {o}" for o in p.opts + p.secondary_opts if o not in text]
    assert missing == []
    for must in ("--train-modules", "--recompute", "--skip-bad-images", "--prefetch-mib"):
        assert must in section(html, "edgetrain-train")


def test_figures_are_copied_into_the_site(site):
    figures = set(re.findall(r"figures/([\w.\-]+\.png)", "".join(
        p.read_text(encoding="utf-8") for p in pages()[:-1])))
    assert figures and all((site / "figures" / f).is_file() for f in figures)


# --------------------------------------------------------------------------- README, contract
def test_readme_is_a_landing_page():
    text = README.read_text(encoding="utf-8")
    assert len(text) <= 12_000
    assert TEST_COMMAND in text
    assert "pip install -e . && edgetrain train" in text
    figure = re.search(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert figure and (ROOT / figure.group(1)).is_file()


def test_no_reference_to_the_removed_stage_loss_module():
    stale = "train." + "stage_loss"  # the module it named no longer exists
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout
    hits = [f for f in files.split() if f.endswith((".py", ".md", ".toml", ".yml", ".txt"))
            and (ROOT / f).is_file() and stale in (ROOT / f).read_text(encoding="utf-8")]
    assert hits == []


def test_every_script_and_result_the_pages_name_exists():
    """A script the manual tells you to run exists where it says; a results file it names
    exists under benchmarks/results/ or research/ (studies move, their file names stay)."""
    text = "".join(p.read_text(encoding="utf-8") for p in pages())
    scripts = set(re.findall(r"python ((?:benchmarks|research)/[\w./-]+\.py)", text))
    results = set(re.findall(r"benchmarks/results/([\w.-]+\.(?:md|json|png))", text))
    found = {p.name for base in ("benchmarks/results", "research") if (ROOT / base).is_dir()
             for p in (ROOT / base).rglob("*")}
    assert scripts and sorted(s for s in scripts if not (ROOT / s).is_file()) == []
    assert results and sorted(r for r in results if r not in found) == []


def contract_names() -> set[str]:
    from edgetrain.storage import rundir
    rows = re.findall(r"^\| `([^`]+)` \|", rundir.__doc__, re.M)
    return {r.split("/")[0] if "/" in r.rstrip("/") else r.rstrip("/") for r in rows}


def test_run_directory_contract_names_every_file_of_a_finished_run(tmp_path):
    from click.testing import CliRunner
    from edgetrain.cli import cli
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--width", "8", "--depth", "4", "-K", "2", "--epochs",
                                 "2", "--mode", "sequential", "--train-size", "200",
                                 "--no-progress", "--out", str(out)])
    assert r.exit_code == 0, r.output
    names = contract_names()
    assert {"config.json", "metrics.json", "modules", "state.json", "log.jsonl"} <= names
    assert sorted(p.name for p in out.iterdir() if p.name not in names) == []
    assert all(p.name[:2].isdigit() for p in (out / "modules").iterdir())


# --------------------------------------------------------------------------- the results hook
def load_hook():
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    import importlib.util
    spec = importlib.util.spec_from_file_location("docs_results_hook", DOCS / "hooks" / "results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hook_finds_a_result_by_name_wherever_its_study_moved(tmp_path, monkeypatch):
    hook = load_hook()
    from mkdocs.exceptions import PluginError
    moved = tmp_path / "research" / "paper_cpu" / "accuracy-paper-cpu.md"
    moved.parent.mkdir(parents=True)
    moved.write_text("# Title\n\n| a |\n|---|\n| 1 |\n")
    monkeypatch.setattr(hook, "ROOT", tmp_path)
    assert hook.find_result("accuracy-paper-cpu.md") == moved
    with pytest.raises(PluginError, match="nowhere.png"):
        hook.find_result("nowhere.png")
    page = 'x\n??? note "t"\n    <!-- result: accuracy-paper-cpu.md -->\ny\n'
    assert hook.on_page_markdown(page, None, None, None) == (
        'x\n??? note "t"\n    ### Title\n\n    | a |\n    |---|\n    | 1 |\ny\n')


def test_headline_figure_is_drawn_from_the_measured_results(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "headline.png"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "headline_memory.py"),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
