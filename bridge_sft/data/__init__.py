"""Chat data for SFT: formats, exact assistant-only masks, packing, caching, Bridge datasets.

Public API (no torch or megatron import): ``encode_conversation``,
``EncodedConversation``, ``ChatEncoder``, ``render_supervised``, ``DataError``,
``RecordError``.
The Bridge ``DatasetProvider`` is ``bridge_sft.data.provider.SFTDatasetProvider``
(it imports megatron).
"""

from bridge_sft.data.encoding import ChatEncoder, EncodedConversation, encode_conversation, render_supervised
from bridge_sft.data.formats import DataError, RecordError

__all__ = [
    "ChatEncoder", "DataError", "EncodedConversation", "RecordError", "encode_conversation", "render_supervised",
]
