"""``python -m bridge_sft.cli``: the same as the ``bridge-sft`` command (handy under torchrun)."""

import sys

from bridge_sft.cli import main

sys.exit(main())
