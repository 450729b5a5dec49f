"""The README cannot drift from the code: every command it shows is run here (or is what CI runs).

Each fenced ``bash``/``python`` block in README.md is preceded by a marker:

- ``<!-- readme-test: run -->``: the commands run verbatim, in order, in a fresh directory that
  looks like the repository root after ``make demo`` (``outputs/demo`` made by ``bridge-sft demo``);
- ``<!-- readme-test: python -->``: the snippet runs verbatim there too;
- ``<!-- readme-test: dry-run -->``: GPU commands, run on the CPU with ``--dry-run`` and local
  stand-ins for their paths (``torchrun ... -m bridge_sft.cli`` becomes ``bridge-sft``);
- ``<!-- readme-test: setup -->``: the set-up commands, checked against what Makefile, tools/venv.sh
  and .ci/run execute.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from launch import REPO, run_python
from terminal import ALARMING, run_in_pty, screen

README = (REPO / "README.md").read_text()
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<kind>[\w-]+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def blocks(kind: str | None = None) -> list[tuple[str | None, str, str]]:
    found = [(m["kind"], m["lang"], m["body"]) for m in BLOCK.finditer(README)]
    return [b for b in found if kind is None or b[0] == kind]


def commands(kind: str) -> list[str]:
    return [line.split("  #")[0].strip() for _, _, body in blocks(kind) for line in body.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_every_shell_or_python_block_is_marked():
    for kind, lang, body in blocks():
        if lang in ("bash", "python"):
            assert kind in ("run", "python", "dry-run", "setup"), f"unmarked README block:\n{body}"


def test_setup_commands_are_what_make_and_ci_run():
    makefile = (REPO / "Makefile").read_text()
    venv_script = (REPO / "tools/venv.sh").read_text()
    expected = {
        "make demo": lambda: re.search(r"^demo: venv\n\t.*bridge-sft demo$", makefile, re.M),
        "make test": lambda: re.search(r"^test: venv\n\t.*-m pytest", makefile, re.M)
        and "make test" in (REPO / ".ci/run").read_text(),
        "pip install --no-deps -e .": lambda: re.search(r"install .*--no-deps .*-e \.$", venv_script, re.M),
    }
    shown = commands("setup")
    assert shown, "no set-up commands in the README"
    for command in shown:
        assert command in expected, f"README shows {command!r}, which no test knows"
        assert expected[command](), f"{command!r} does not do what the README says"


def env() -> dict[str, str]:
    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def sh(command: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, shell=True, cwd=cwd, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def after_make_demo(tmp_path_factory) -> Path:
    """A working directory like the repository root after `make demo` (a short demo run, on a terminal:
    its console fits on one screen, with one live progress line and no noise)."""
    root = tmp_path_factory.mktemp("readme")
    (root / "bridge_sft").symlink_to(REPO / "bridge_sft")
    (root / "recipes").symlink_to(REPO / "recipes")
    code, raw = run_in_pty(["bridge-sft", "demo", "--steps", "6"], cwd=root, env=env())
    lines = screen(raw)  # what stays on the terminal: the progress line's redraws are one line
    text = "\n".join(lines)
    assert code == 0, raw[-5000:]
    assert len(lines) <= 60, text
    assert "bridge-sft demo: summary" in text
    assert sum(line.startswith("train ━") and " 6/6 loss " in line for line in lines) == 1, text
    assert not ALARMING.search(text), text
    assert (root / "outputs/demo/loss_curve.png").is_file()
    assert (root / "outputs/demo/tiny-hf/config.json").is_file()
    assert "Configuration Summary" in (root / "outputs/demo/run/logs/rank0.log").read_text()
    return root


def test_tour_commands_run_verbatim(after_make_demo):
    tour = commands("run")
    assert [c.split()[:3] for c in tour] == [["bridge-sft", "data", "preview"], ["bridge-sft", "data", "prepare"],
                                             ["bridge-sft", "train", "tiny"], ["bridge-sft", "convert", "export"],
                                             ["bridge-sft", "chat", "outputs/tour-hf"]]
    outputs = [sh(command, after_make_demo).stdout for command in tour]
    assert "[[" in outputs[0] and "supervised" in outputs[0]
    assert "packing" in outputs[1]
    assert "done: 20 iterations" in outputs[2] and (after_make_demo / "outputs/tour/logs/rank0.log").is_file()
    assert (after_make_demo / "outputs/tour-hf/model.safetensors").is_file()


def test_python_snippet_runs_verbatim(after_make_demo):
    (snippet,) = [body for kind, _, body in blocks("python")]
    script = after_make_demo / "readme_snippet.py"
    script.write_text(snippet)
    proc = sh(f"{shlex.quote(sys.executable)} readme_snippet.py", after_make_demo)
    assert "supervised tokens/s" in proc.stdout
    assert (after_make_demo / "outputs/python-api/checkpoints").is_dir()


def test_gpu_commands_resolve_with_dry_run(tmp_path, tiny_qwen3):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    cases = {}
    for i, command in enumerate(commands("dry-run")):
        argv = shlex.split(command)
        if argv[0] == "torchrun":  # the same CLI on every rank
            argv = ["bridge-sft", *argv[argv.index("bridge_sft.cli") + 1:]]
        assert argv[:2] == ["bridge-sft", "train"], command
        # stand-ins for the GPU host's paths: a local HF dir of the right architecture, local data
        argv = [a for a in argv[1:] if not a.startswith(("hf_path=", "data="))]
        cases[str(i)] = [*argv, f"hf_path={tiny_qwen3}", f"data={data}", "--dry-run"]
    assert len(cases) >= 3
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    results = json.loads(run_python("cli_batch.py", spec).stdout.rsplit("CLI-RESULT ", 1)[1].splitlines()[0])
    for name, result in results.items():
        assert result["code"] == 0, (cases[name], result)
