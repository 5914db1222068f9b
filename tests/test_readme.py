"""The README's examples stay true: its Python API block runs as written, its command-line synopsis lists the
options the commands take, and its test command is the one CI runs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from uniter_fast import UniterConfig
from uniter_fast.cli import main
from uniter_fast.model import UniterModel
from uniter_fast.model.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fenced_blocks(language: str) -> list[str]:
    """The README's fenced code blocks of this language ("" for none)."""
    blocks, current, opened_as = [], None, None
    for line in README.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, opened_as = [], line[3:].strip()
            else:
                if opened_as == language:
                    blocks.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def help_text(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_the_python_api_example_runs_as_written(tmp_path, monkeypatch):
    """The block loads "uniter-base.pt" from the working directory: a 2-layer model with BERT's vocabulary (the
    block's word ids) and 2048-d regions stands in for it; the shapes are the ones its comments give."""
    (block,) = fenced_blocks("python")
    config = UniterConfig.preset("tiny", vocab_size=30522)
    monkeypatch.chdir(tmp_path)
    save_checkpoint(UniterModel(config), "uniter-base.pt")
    names: dict = {}
    exec(compile(block, "README.md", "exec"), names)  # noqa: S102 - the project's own README
    assert names["hidden"].shape == (3 + 36, config.hidden_size)  # (total_tokens, hidden), packed
    assert names["text_rows"].shape == (3, config.hidden_size)
    assert names["region_rows"].shape == (36, config.hidden_size)
    torch.testing.assert_close(torch.cat([names["text_rows"], names["region_rows"]]), names["hidden"])


def synopsis() -> str:
    (block,) = [b for b in fenced_blocks("") if b.startswith("uniter-fast pretrain")]
    return block


def test_the_command_line_synopsis_lists_the_pretrain_options(capsys):
    """Every option of `uniter-fast pretrain` is in the README's synopsis and every option there exists."""
    pretrain_lines = synopsis().split("uniter-fast env")[0]
    documented = set(re.findall(r"--[a-z][a-z-]*", pretrain_lines))
    offered = set(re.findall(r"--[a-z][a-z-]*", help_text(["pretrain"], capsys))) - {"--help"}
    assert documented == offered


def test_the_command_line_synopsis_names_every_converter(capsys):
    documented = set(re.search(r"convert (\S+) SRC", synopsis()).group(1).split("|")) | {"synthetic"}
    assert "uniter-fast convert synthetic DST" in synopsis()
    offered = re.search(r"\{([a-z,]+)\}", help_text(["convert"], capsys)).group(1).split(",")
    assert documented == set(offered)


def test_ci_runs_the_readmes_test_command():
    """.ci/run installs what the README's test command installs and runs the same pytest command."""
    (command,) = [b.strip() for b in fenced_blocks("bash") if "pytest" in b]
    ci = (ROOT / ".ci" / "run").read_text()
    for step in command.split(" && "):
        assert step.replace("pip install", "python -m pip install -q") in ci, step
