"""Driver: ``bridge-sft train ARGV...`` with messages (or a failure) injected at iteration 2.

Usage: ``console_train.py messages|fail ARGV...``. The command is ``bridge_sft.cli.main(ARGV)``
unchanged, except that ``bridge_sft.train.run`` gets one more Bridge callback (through
``bridge_sft.console.progress_callbacks``), which at the end of iteration 2

- ``messages``: emits what the console must show (a Python warning not on the allow-list,
  a spiky-loss report as Bridge's rerun state machine logs it, an ERROR record, a raw line
  on file descriptor 2 as C code writes it), and a warning on the allow-list, which it must
  not show; each text starts with ``bridge-sft test:`` or names the test;
- ``fail``: raises ``RuntimeError`` inside Bridge's training loop.
"""

import logging
import os
import sys
import warnings

import bridge_sft.console
from bridge_sft.cli import main

MODE = sys.argv[1]


def inject(context) -> None:
    """At the end of iteration 2 (see the module docstring)."""
    if context.state.train_state.step + 1 != 2:
        return
    if MODE == "fail":
        raise RuntimeError("bridge-sft test: injected failure at iteration 2")
    warnings.warn("bridge-sft test: an injected real warning", UserWarning)
    logging.getLogger("megatron.core.rerun_state_machine").warning(
        "Rank 0, node test, device 0, iteration 2: Unexpected result 73.5 (message='Spiky loss')")
    logging.getLogger("megatron.bridge.training.train").error("bridge-sft test: an injected error record")
    os.write(2, b"bridge-sft test: a raw line on stderr\n")
    warnings.warn("Transformer Engine and Apex are not installed. Falling back to bridge-sft test code.")


def with_injection(console):
    """The CLI's callbacks (its progress callback stays last) plus one running ``inject``; Bridge is
    imported here, inside the console session, as the CLI imports it."""
    from megatron.bridge.training.callbacks import Callback

    class Inject(Callback):
        def on_train_step_end(self, context) -> None:
            inject(context)

    callbacks = progress_callbacks(console)
    return [*callbacks[:-1], Inject(), callbacks[-1]]


progress_callbacks = bridge_sft.console.progress_callbacks
bridge_sft.console.progress_callbacks = with_injection

if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))
