"""Driver: run ``bridge-sft`` argument lists in-process; print their exit codes and stderr as JSON.

Usage: ``cli_batch.py CASES.json`` with ``{"name": ["train", ...], ...}``. The stderr of each
case is captured; the CLI's contract for user errors is exit code 2 and one ``error: ...`` line.
"""

import contextlib
import io
import json
import sys

from bridge_sft.cli import main


def run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse errors
            code = exc.code
    return {"code": code, "error_lines": [line for line in err.getvalue().splitlines() if line.startswith("error")]}


if __name__ == "__main__":
    cases = json.load(open(sys.argv[1]))
    print("\nCLI-RESULT " + json.dumps({name: run(argv) for name, argv in cases.items()}))
