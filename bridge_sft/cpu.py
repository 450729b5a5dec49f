"""The CPU runtime's public names, kept here for existing code: it lives in ``bridge_sft.runtime``."""

from bridge_sft.runtime import (  # noqa: F401
    TransformerEngineOnCPUError,
    configure,
    configure_model,
    enable,
    is_enabled,
    maybe_enable,
)
