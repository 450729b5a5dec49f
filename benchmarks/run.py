"""Run every benchmark of the project and write one table of ratios against the baselines
measured in the same run (Markdown + JSON).

    python benchmarks/run.py                 # CPU, about 4 minutes on 2 cores
    python benchmarks/run.py --full          # every benchmark's full size (about 20 minutes)
    python benchmarks/run.py --only step_overhead token_efficiency --out-dir /tmp/bench

Each benchmark runs in its own Python process (Megatron keeps global state; a crash or a
timeout of one is reported in the table, and the others still run), one after another,
never two training processes at a time. What the default run does:

| benchmark | module | default size |
|---|---|---|
| loss path | ``benchmarks/loss_path.py`` | ``quick``: seq 2048, fp32 and bf16, one repeat |
| data preprocessing | ``benchmarks/data_preprocessing.py`` | ``quick``: first 1,000 dialogs |
| packing efficiency | ``benchmarks/packing_efficiency.py`` | ``quick``: bundled dialogs |
| useful-token efficiency | ``benchmarks/token_efficiency.py`` | full: bundled + full ChatterBot, and long versions |
| step overhead | ``benchmarks/step_overhead.py`` | 2 processes x 48 interleaved iterations |
| model families | ``benchmarks/families.py`` | ``quick``: 4 rotating rounds over every tiny family |
| gated DeltaNet kernels | ``benchmarks/gated_delta.py`` | ``quick``: seq 1,024, 8 heads of 128, 2 rounds |
| dynamic padding | ``benchmarks/dynamic_padding.py`` | ``quick``: bundled data, 40 interleaved iterations |
| validation | ``benchmarks/validation.py`` | ``quick``: 3 training processes of 6 iterations |
| eval generation | ``benchmarks/eval_generation.py`` | ``quick``: tiny Llama, 24 prompts, 2 rounds |

``--full`` runs every benchmark with ``quick=False`` (step overhead: 3 x 60).
Results: ``results.md`` and ``results.json`` in ``--out-dir`` (default ``outputs/bench``);
``--markdown`` / ``--json`` name the files instead. The Markdown starts with the summary
(one ratio per line, each against a baseline measured in the same run), then every
benchmark's own table; the JSON holds everything, the raw rows included, with the
machine's load average before and after (these machines are shared: read ratios, not
absolute times).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table  # noqa: E402

# name -> (module, kwargs of run() by default, kwargs with --full)
BENCHMARKS: dict[str, tuple[str, dict, dict]] = {
    "loss_path": ("benchmarks.loss_path", {"quick": True}, {"quick": False}),
    "data_preprocessing": ("benchmarks.data_preprocessing", {"quick": True}, {"quick": False}),
    "packing_efficiency": ("benchmarks.packing_efficiency", {"quick": True}, {"quick": False}),
    "token_efficiency": ("benchmarks.token_efficiency", {"quick": False}, {"quick": False}),
    "step_overhead": ("benchmarks.step_overhead", {"quick": True, "repeats": 2, "iters": 48}, {"quick": False}),
    "families": ("benchmarks.families", {"quick": True}, {"quick": False}),
    "gated_delta": ("benchmarks.gated_delta", {"quick": True}, {"quick": False}),
    "dynamic_padding": ("benchmarks.dynamic_padding", {"quick": True}, {"quick": False}),
    "validation": ("benchmarks.validation", {"quick": True}, {"quick": False}),
    "eval_generation": ("benchmarks.eval_generation", {"quick": True}, {"quick": False}),
}

_CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
import {module} as bench
rows = bench.run(**{kwargs!r})
with open({out!r}, "w") as f:
    json.dump(rows, f, default=str)
"""


def run_benchmark(name: str, kwargs: dict, timeout_s: float) -> dict:
    """Run one benchmark's ``run(**kwargs)`` in a fresh process; its rows, or the error, and its duration."""
    module = BENCHMARKS[name][0]
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        out = Path(tmp) / "rows.json"
        code = _CHILD.format(repo=str(REPO), module=module, kwargs=kwargs, out=str(out))
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout_s, check=False)
            seconds = time.perf_counter() - t0
            if proc.returncode == 0 and out.exists():
                return {"name": name, "status": "ok", "seconds": seconds, "kwargs": kwargs,
                        "rows": json.loads(out.read_text())}
            error = f"exit code {proc.returncode}:\n{proc.stdout[-3000:]}"
        except subprocess.TimeoutExpired as exc:
            seconds = time.perf_counter() - t0
            tail = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            error = f"timed out after {timeout_s:.0f} s:\n{tail[-3000:]}"
    return {"name": name, "status": "failed", "seconds": seconds, "kwargs": kwargs, "error": error, "rows": []}


# --------------------------------------------------------------------------- summary lines


def _line(benchmark: str, measure: str, ours, baseline, ratio, meaning: str) -> dict:
    return {"benchmark": benchmark, "measure": measure, "bridge-sft": ours, "baseline": baseline, "ratio": ratio,
            "ratio means": meaning}


def _summary_loss_path(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r.get("benchmark") != "loss path":
            continue
        what = f"{r['level']} {r['dtype']} seq {r['seq']}"
        out.append(_line("loss path", f"{what}: peak memory", "labels-in", r["baseline"],
                         r["memory_ratio (baseline/internal)"], "baseline / ours (>1: ours needs less)"))
        out.append(_line("loss path", f"{what}: time", "labels-in", r["baseline"],
                         r["speedup (baseline/internal)"], "baseline / ours (>1: ours is faster)"))
    for r in rows:
        if r.get("benchmark") != "fused loss head":
            continue
        what = f"{r['level']} {r['dtype']} seq {r['seq']} vocab {r['vocab']:,}"
        out.append(_line("fused loss head", f"{what}: peak memory", "fused head", "megatron-core's head",
                         r["memory_ratio (fused/internal)"], "fused / megatron-core (<1: fused needs less)"))
        out.append(_line("fused loss head", f"{what}: time", "fused head", "megatron-core's head",
                         r["time_ratio (fused/internal)"], "fused / megatron-core (<1: fused is faster)"))
    return out


def _summary_data_preprocessing(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if "speedup_vs_bridge" in r and not r["method"].startswith("bridge _chat"):
            ceiling = " (reference: no masks, not bridge-sft)" if r["method"].startswith("plain") else ""
            out.append(_line("data preprocessing", f"tokens/s, {r['processes']} process(es){ceiling}", r["method"],
                             "bridge _chat_preprocess", r["speedup_vs_bridge"], "ours / Bridge (>1: ours faster)"))
        elif "speedup_vs_cold" in r:
            out.append(_line("data preprocessing", "cache warm load vs cold build", r["method"], "cold build",
                             r["speedup_vs_cold"], "cold / warm"))
        elif "tokens_masked_differently" in r:
            out.append(_line("data preprocessing", "same input_ids as Bridge", f"{r['identical_input_ids']} conv.",
                             f"{r['conversations']} conv.", r["identical_input_ids"] / max(r["conversations"], 1),
                             "share identical"))
    return out


def _summary_packing_efficiency(rows: list[dict]) -> list[dict]:
    return [_line("packing efficiency", f"real tokens / slot, {r['data']}, seq {r['seq_length']}", r["efficiency"],
                  "bridge first_fit_shuffle", r["vs_bridge_default"], "ours / Bridge default (>1: fewer packs)")
            for r in rows if "efficiency" in r and str(r.get("method", "")).startswith("bridge-sft")]


def _summary_token_efficiency(rows: list[dict]) -> list[dict]:
    from benchmarks.token_efficiency import OURS

    out = []
    for r in rows:
        if r.get("method") != OURS:
            continue
        what = f"supervised tokens / slot, {r['data']}, seq {r['seq_length']}"
        out.append(_line("useful-token efficiency", what, r["useful_efficiency"], "bridge first_fit_shuffle",
                         r["vs_bridge_packing"], "ours / Bridge packing"))
        out.append(_line("useful-token efficiency", what, r["useful_efficiency"], "pad to seq_length",
                         r["vs_padding"], "ours / padding"))
    return out


def _summary_step_overhead(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r.get("summary"):
            checks_ok = (r["supervised_tokens_ours"] == r["supervised_tokens_bridge"]
                         == r["supervised_tokens_counted_by_our_step"])
            spread = (f"95% CI {r['ratio_ci95_low']:.4f}-{r['ratio_ci95_high']:.4f}" if "ratio_ci95_low" in r
                      else f"p25-p75 {r['ratio_p25']:.4f}-{r['ratio_p75']:.4f}")
            out.append(_line(
                "step overhead", f"seconds per iteration ({r['model']}, {r['pairs']} pairs, {spread})",
                "bridge_sft.step", "gpt_step.forward_step",
                r["ratio (ours/bridge)"], f"ours / Bridge (target <= {r['target']}); supervised tokens "
                f"{'equal' if checks_ok else 'DIFFER'}"))
    return out


def _summary_families(rows: list[dict]) -> list[dict]:
    return [_line("model families", f"step time, tiny {r['family']} ({r['rounds']} rotating rounds)",
                  f"{r['median_ms']:.1f} ms", "tiny llama", r["ratio_vs_llama"], "family / llama (same size)")
            for r in rows if r.get("family") not in (None, "llama")]
def _summary_dynamic_padding(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if "gain" in r:
            out.append(_line("dynamic padding", f"supervised tokens / slot, {r['data']}, seq {r['seq_length']}, "
                             f"micro-batch {r['micro_batch_size']}", round(r["efficiency_dynamic"], 4),
                             f"pad to seq_length ({r['efficiency_padded']:.4f})", r["gain"],
                             "ours / padded (>1: fewer slots for the same supervised tokens)"))
        elif r.get("summary"):
            out.append(_line("dynamic padding", f"seconds per iteration ({r['model']}, {r['pairs']} pairs, 95% CI "
                             f"{r['ratio_ci95_low']:.3f}-{r['ratio_ci95_high']:.3f})", "padding longest",
                             "pad to seq_length", r["speedup (padded/dynamic)"],
                             f"padded / ours (>1: ours faster); pair losses differ by "
                             f"{r['max_pair_loss_rel_diff']:.1e}"))
    return out


def _summary_gated_delta(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        shape = f"{r['heads']} heads of {r['head_dim']}" if r["heads"] else r["head_dim"]
        what = f"{r['what']}, seq {r['tokens']}, {shape}"
        if "ratio_recurrence_vs_ours" in r:
            out.append(_line("gated DeltaNet", f"{what}: CPU time", "plain-torch stand-in", "per-token loop",
                             r["ratio_recurrence_vs_ours"], "loop / ours (>1: ours is faster)"))
        if "ratio_hf_chunked_vs_ours" in r:
            out.append(_line("gated DeltaNet", f"{what}: CPU time", "plain-torch stand-in", "HF chunked torch path",
                             r["ratio_hf_chunked_vs_ours"], "HF chunked / ours (>1: ours is faster)"))
    return out


def _summary_validation(rows: list[dict]) -> list[dict]:
    return [_line("validation", f"seconds per evaluation, {r['variant']} ({r['supervised tokens per evaluation']:,.0f} "
                  f"supervised tokens; loss spread at lr 0: {r['loss spread at lr 0']:.2g})",
                  f"{r['seconds per evaluation']:.2f} s", "sampled window (eval_iters=2)",
                  r["time ratio vs sampled window"], "variant / sampled window (>1: costs more)")
            for r in rows if not r["variant"].startswith("sampled")]


def _summary_eval_generation(rows: list[dict]) -> list[dict]:
    return [_line("bridge-sft eval", f"answers/s, {r['model']} ({r['prompts']} prompts, batch {r['batch_size']}, "
                  f"same answers: {r.get('same_answers')})", round(r["answers_per_s"], 2), "HF generate one by one",
                  r["speedup_vs_one_by_one"], "batched / one by one (>1: batched faster)")
            for r in rows if r.get("way") == "batched"]


SUMMARIES = {
    "validation": _summary_validation,
    "eval_generation": _summary_eval_generation,
    "families": _summary_families,
    "gated_delta": _summary_gated_delta,
    "loss_path": _summary_loss_path,
    "data_preprocessing": _summary_data_preprocessing,
    "packing_efficiency": _summary_packing_efficiency,
    "token_efficiency": _summary_token_efficiency,
    "step_overhead": _summary_step_overhead,
    "dynamic_padding": _summary_dynamic_padding,
}


def summarize(results: list[dict]) -> list[dict]:
    """One summary line per ratio; a failed benchmark (or one whose rows cannot be read) gets a line saying so."""
    lines = []
    for res in results:
        if res["status"] != "ok":
            first = res["error"].strip().splitlines()[-1] if res["error"].strip() else res["error"]
            lines.append(_line(res["name"], "FAILED", "", "", "", first[:200]))
            continue
        try:
            found = SUMMARIES[res["name"]](res["rows"])
        except Exception as exc:  # a benchmark changed its row format: report, do not crash
            found = [_line(res["name"], "rows could not be summarised", "", "", "", f"{type(exc).__name__}: {exc}")]
        lines += found or [_line(res["name"], "no ratio rows", "", "", "", "see the benchmark's own table")]
    return lines


def _details(res: dict) -> str:
    if res["status"] != "ok":
        return f"FAILED after {res['seconds']:.0f} s:\n\n```text\n{res['error']}\n```"
    try:
        module = importlib.import_module(BENCHMARKS[res["name"]][0])
        render = getattr(module, "markdown", None)
        if render is not None:
            return render(res["rows"])
    except Exception as exc:  # fall back to a plain table
        return f"({type(exc).__name__} in its markdown(): {exc})\n\n" + markdown_table(res["rows"])
    return markdown_table(res["rows"])


def machine() -> dict:
    """Cores, CPU model and Python/torch versions of this machine."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def report(results: list[dict], meta: dict) -> str:
    """The Markdown report: header, summary table, then each benchmark's own table."""
    load = f"load average {meta['load_before'][0]:.2f} before, {meta['load_after'][0]:.2f} after (1 min)"
    lines = [
        f"# bridge-sft benchmarks ({meta['mode']}), {meta['date']}",
        "",
        f"{meta['machine']['cores']} cores ({meta['machine']['cpu']}), OMP_NUM_THREADS="
        f"{meta['machine']['omp_num_threads']}, {load}; {meta['seconds']:.0f} s in all. Ratios compare runs "
        "measured side by side in this run.",
        "",
        "## Summary",
        "",
        markdown_table(meta["summary"], ["benchmark", "measure", "bridge-sft", "baseline", "ratio", "ratio means"]),
    ]
    for res in results:
        lines += ["", f"## {res['name']} ({res['status']}, {res['seconds']:.0f} s, run({res['kwargs']}))", "",
                  _details(res)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every benchmark at full size (quick=False)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--out-dir", default=str(REPO / "outputs" / "bench"), help="folder for results.md/.json")
    parser.add_argument("--markdown", help="Markdown file (default OUT_DIR/results.md)")
    parser.add_argument("--json", help="JSON file (default OUT_DIR/results.json)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed to each benchmark")
    args = parser.parse_args(argv)

    names = args.only or list(BENCHMARKS)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results = []
    for name in names:
        kwargs = BENCHMARKS[name][2 if args.full else 1]
        print(f"[bench] {name} run({kwargs}) ...", flush=True)
        res = run_benchmark(name, kwargs, args.timeout)
        print(f"[bench] {name}: {res['status']} in {res['seconds']:.0f} s", flush=True)
        results.append(res)
    meta = {
        "mode": "full" if args.full else "default", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(), "load_before": load_before, "load_after": os.getloadavg(),
        "seconds": time.perf_counter() - t0, "summary": summarize(results),
    }
    md_path = Path(args.markdown or Path(args.out_dir) / "results.md")
    json_path = Path(args.json or Path(args.out_dir) / "results.json")
    for path in (md_path, json_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    text = report(results, meta)
    md_path.write_text(text)
    json_path.write_text(json.dumps({**meta, "benchmarks": results}, indent=1, default=str))
    print(text)
    print(f"[bench] wrote {md_path} and {json_path}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
