"""The multimodal checkpoints whose language model bridge-sft trains after ``bridge-sft convert text-only``.

A table only (no heavy imports): the CLI's help, the one-line refusal (``bridge_sft.models.multimodal_message``)
and the conversion (``bridge_sft.conversion.text_only``) all read it.
"""

# multimodal (``*ForConditionalGeneration``) architecture -> the causal LM class of its language model. In
# transformers 5.12 each holds its language model as ``model.language_model`` (the causal LM's ``model``) and its
# output layer as ``lm_head`` (the causal LM's ``lm_head``).
TEXT_ONLY_ARCHITECTURES = {
    "Gemma3ForConditionalGeneration": "Gemma3ForCausalLM",
    "Gemma4ForConditionalGeneration": "Gemma4ForCausalLM",
    "Qwen3_5ForConditionalGeneration": "Qwen3_5ForCausalLM",
    "Qwen3_5MoeForConditionalGeneration": "Qwen3_5MoeForCausalLM",
}
