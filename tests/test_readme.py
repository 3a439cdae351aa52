"""Every `bash` block of the README runs verbatim, in order, from one empty directory, as a new user would run
them (blocks fenced `shell` are templates: your model, GPUs, a cluster). Long commands get a smaller budget,
listed in BUDGET; the install line's `pip install` is the environment this test already runs in."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
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


def test_readme_has_runnable_blocks():
    blocks = bash_blocks(README.read_text())
    assert len(blocks) >= 6
    assert ["capscale demo"] == commands(blocks[0][1])  # the quick start's main job


@pytest.mark.slow
def test_every_readme_bash_block_runs_from_an_empty_directory(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for line, block in bash_blocks(README.read_text()):
        script = "\n".join(c + " --bootstrap 20" if c == "capscale demo" else c for c in commands(block))
        done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, f"README block at line {line}:\n{script}\n{done.stderr[-3000:]}"
