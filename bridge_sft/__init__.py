"""bridge-sft: supervised fine-tuning of Hugging Face LLMs on Megatron-Bridge.

Importing this package imports neither torch nor megatron and patches nothing. It
installs one import gate (``bridge_sft.runtime``): when megatron is first imported
in the process, the runtime this host needs (CPU, or a GPU without Transformer
Engine) is switched on first; on a GPU with Transformer Engine it does nothing.
"""

from bridge_sft.runtime import install_import_gate

__version__ = "0.1.0"

install_import_gate()
