"""The package's import graph is one-way (pyproject.toml [tool.importlinter]), and the contract catches a loop."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(REPO / "pyproject.toml")], cwd=root, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_import_contract_holds_and_fails_when_a_loop_is_put_back(tmp_path):
    shutil.copytree(REPO / "sparsetune_cli", tmp_path / "sparsetune_cli",
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert lint(tmp_path).returncode == 0
    # the old loop's first link: the token miner reaching up into the CLI for the config folder
    tokens = tmp_path / "sparsetune_cli" / "tokens.py"
    tokens.write_text(tokens.read_text() + "\n\ndef _loop():\n    from .cli import CONFIG_DIR\n    return CONFIG_DIR\n")
    broken = lint(tmp_path)
    assert broken.returncode != 0 and "BROKEN" in broken.stdout and "sparsetune_cli.tokens" in broken.stdout
