"""bridge-sft: supervised fine-tuning of Hugging Face LLMs on Megatron-Bridge.

Importing this package is inert: it imports neither torch nor megatron and
patches nothing. Megatron is imported, and on a machine without CUDA the CPU
runtime (``bridge_sft.cpu``) switched on, by the modules that need it
(``bridge_sft.train``, ``bridge_sft.step``, ``bridge_sft.recipes``,
``bridge_sft.conversion``, ``bridge_sft.data.provider``).
"""

__version__ = "0.1.0"
