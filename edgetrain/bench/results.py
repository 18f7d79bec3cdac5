"""Writing a benchmark's result: `<stem>.json` and its Markdown page `<stem>.md`, atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgetrain.storage.atomic import atomic_write_json, atomic_write_text


def write_json_and_markdown(result: dict, out_dir: Path, stem: str,
                            markdown: Callable[[dict], str]) -> dict:
    """Write `result` as `out_dir/stem.json` and `markdown(result)` as `out_dir/stem.md`;
    returns `result` with `json_path` and `md_path`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**result, "json_path": str(out_dir / f"{stem}.json"),
              "md_path": str(out_dir / f"{stem}.md")}
    atomic_write_json(Path(result["json_path"]), result)
    atomic_write_text(Path(result["md_path"]), markdown(result))
    return result
