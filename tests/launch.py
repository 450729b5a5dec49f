"""Run test drivers in their own processes.

Megatron-Bridge and megatron-core keep process-global singletons (a second
``finetune()`` in one process fails), so every test that runs Bridge's
training loop runs its driver script in a fresh Python process, or under
``torchrun`` for multi-rank (gloo) tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVERS = Path(__file__).resolve().parent / "drivers"
CORES = os.cpu_count() or 1


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str], timeout: float, check: bool) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}; output tail:\n{proc.stdout[-6000:]}")
    return proc


def run_python(script: str | Path, *args: str, timeout: float = 600, check: bool = True):
    """Run ``python script args`` (``script`` relative to tests/drivers/ or absolute); return the process."""
    return _run([sys.executable, str(DRIVERS / script), *map(str, args)], _env(CORES), timeout, check)


def run_torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: float = 600, check: bool = True):
    """Run ``script`` under torchrun with ``nproc`` ranks on one node (gloo on CPU); return the process."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        str(DRIVERS / script), *map(str, args),
    ]
    return _run(cmd, _env(max(1, CORES // nproc)), timeout, check)


def python_facts(code: str, timeout: float = 300) -> dict:
    """Run ``python -c code`` in a fresh process (the repository importable); return the JSON it prints after
    ``FACTS `` on one line."""
    import json

    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("FACTS ", 1)[1].splitlines()[0])


def stand_in_facts(imports: str, facts: dict[str, str], packages: tuple[str, ...]) -> dict:
    """In a fresh process that imported bridge_sft and ran ``imports``: each of ``facts`` (name -> Python
    expression) evaluated, plus whether the first of ``packages`` (CUDA-only kernel packages served to some
    megatron modules only) is importable by anyone else, and which of them ``sys.modules`` holds."""
    lines = [f"    {name!r}: {expression}," for name, expression in facts.items()]
    code = "\n".join(["import sys, json", "import bridge_sft", imports, "try:", f"    import {packages[0]}",
                       "    importable = True", "except ImportError:", "    importable = False",
                       "print('FACTS', json.dumps({", *lines, "    'importable_elsewhere': importable,",
                       f"    'in_sys_modules': [m for m in sys.modules if m.split('.')[0] in {packages!r}],",
                       "}))"])
    return python_facts(code)


def run_spec(driver: str, tmp_path: Path, name: str, spec: dict, nproc: int = 1) -> dict:
    """Write ``spec`` (plus ``out``) to JSON, run ``driver SPEC`` (under torchrun if ``nproc > 1``), and
    return the JSON the driver wrote to ``spec["out"]``."""
    import json

    spec = {"out": str(tmp_path / f"{name}.json"), **spec}
    spec_path = tmp_path / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    if nproc == 1:
        run_python(driver, spec_path)
    else:
        run_torchrun(driver, spec_path, nproc=nproc)
    return json.loads(Path(spec["out"]).read_text())


def train_tiny(tmp_path: Path, name: str, spec: dict, nproc: int = 1) -> dict:
    """Run tests/drivers/train_tiny.py with ``spec`` (see its docstring); return its result.

    The result's ``losses`` and ``val_losses`` are ``{iteration: lm loss}`` with int keys.
    """
    result = run_spec("train_tiny.py", tmp_path, name, spec, nproc)
    for key in ("losses", "val_losses"):
        result[key] = {int(k): v for k, v in result[key].items()}
    return result


def run_data_driver(tmp_path: Path, name: str, spec: dict, nproc: int = 1) -> list[dict]:
    """Run tests/drivers/data_run.py with ``spec`` (see its docstring), under torchrun if ``nproc > 1``;
    the result of each rank, with ``losses`` keyed by int and the run's output as ``stdout``."""
    import json

    spec = {"out": str(tmp_path / name), **spec}
    spec_path = tmp_path / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = run_python("data_run.py", spec_path) if nproc == 1 else run_torchrun("data_run.py", spec_path, nproc=nproc)
    results = []
    for rank in range(nproc):
        result = json.loads((tmp_path / f"{name}.{rank}.json").read_text())
        result["losses"] = {int(k): v for k, v in result["losses"].items()}
        result["stdout"] = proc.stdout
        results.append(result)
    return results
