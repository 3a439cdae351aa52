"""Every `bash` block of the README and of each docs/ page runs verbatim, in order, from one empty directory per
page, as a new user would run them (blocks fenced `shell` are templates: your model, GPUs, a cluster). Long
commands get a smaller budget, listed in BUDGET; the install line's `pip install` is the environment this test
already runs in. The README is the front door: at most 15 KB, the package map near the top, links to every page."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BUDGET = {  # text in a README command -> what this test runs instead (same command, smaller budget)
    "--bootstrap 200": "--bootstrap 20",
    "capscale sweep demo_small --workers 2": "capscale sweep demo_small --workers 2 --shard 0/12",
}


def bash_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, body) of each ```bash block."""
    blocks, body, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if body is None:
                body, start, lang = [], number, line[3:].strip()
            else:
                if lang == "bash":
                    blocks.append((start, "\n".join(body)))
                body = None
        elif body is not None:
            body.append(line)
    return blocks


def commands(block: str) -> list[str]:
    """The block's commands (continuation lines joined), with the install step and the test run left out."""
    out = []
    for command in block.replace("\\\n", " ").splitlines():
        command = re.sub(r"\s+#.*$", "", command).strip()
        if not command or command.startswith("#"):
            continue
        parts = [p.strip() for p in command.split("&&")]
        parts = [p for p in parts if not p.startswith("pip install") and "pytest" not in p]
        for part in parts:
            for long, short in BUDGET.items():
                part = part.replace(long, short)
            out.append(part)
    return out


def test_readme_is_the_front_door_and_every_page_has_runnable_blocks():
    text = README.read_text()
    assert len(text.encode()) <= 15 * 1024
    blocks = bash_blocks(text)
    assert ["capscale demo"] == commands(blocks[0][1])  # the quick start's main job
    assert text.index("## The package") < text.index("## 1.")  # the map before the details
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in text, page.name
        assert bash_blocks(page.read_text()), page.name


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_bash_block_runs_from_an_empty_directory(page, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for line, block in bash_blocks(page.read_text()):
        script = "\n".join(c + " --bootstrap 20" if c == "capscale demo" else c for c in commands(block))
        done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, f"{page.name} block at line {line}:\n{script}\n{done.stderr[-3000:]}"
