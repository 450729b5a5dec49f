"""Run the useful-token efficiency benchmark (quick) and a toy case in a fresh process; write JSON.

Usage: ``python bench_token_efficiency.py OUT.json``. (In its own process: the benchmark
switches the CPU runtime on, which must not leak into the pytest process.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import token_efficiency  # noqa: E402

if __name__ == "__main__":
    rows = token_efficiency.run(quick=True)
    toy = token_efficiency.efficiency_rows("toy", [60, 50, 40, 30, 20], supervised=100, seq_length=100)
    Path(sys.argv[1]).write_text(json.dumps({"rows": rows, "toy": toy, "markdown": token_efficiency.markdown(rows)}))
