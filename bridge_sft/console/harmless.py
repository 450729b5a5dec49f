"""The harmless-noise filter: which warnings and output lines reach the console.

``HARMLESS`` is the allow-list of messages known to be harmless, each with the reason; everything
else that looks like a warning or an error is shown (a new warning is never hidden by default).
``LineFilter`` decides for the raw lines a process writes to file descriptors 1 and 2: on rank 0
every stderr line and every stdout line that calls itself a warning or an error; on other ranks
only errors; a traceback's or a warning's continuation lines follow their first line.
"""

from __future__ import annotations

import re

# Messages known to be harmless: (regex searched in a warning's message, a log record's message, or
# a raw output line; why it is harmless). Everything else that looks like a warning reaches the
# console. Extend this tuple, with a reason, when a new harmless message appears; never add a
# pattern that could also match a message about a real problem.
HARMLESS: tuple[tuple[str, str], ...] = (
    (r"Transformer Engine and Apex are not installed\. Falling back to",
     "megatron-core modules that import TE themselves fall back to torch code; bridge-sft serves its plain-torch "
     "TE layers to the layer specs on purpose (the header's runtime line says so)"),
    (r"Apex is not installed\. Falling back to Torch Norm",
     "megatron-core's torch norms where a spec asks for apex's, chosen on purpose without TE/Apex"),
    (r"Only transformer-engine>=[\d.]+ supports MoE experts, but your version is 0\.0\.0",
     "megatron-core probing the TE stand-in bridge-sft serves without TE; experts use local linear layers"),
    (r"Import of FP8GlobalStateManager from megatron\.core\.extensions\.transformer_engine failed",
     "Bridge's import probe for TE's FP8 state (an INFO record with a traceback, printed by its own handler)"),
    (r"gradient_accumulation_fusion requires either TransformerEngine or the fused_weight_gradient_mlp_cuda",
     "the fusion needs TE or Apex; Bridge switches it off, as bridge-sft's runtime does"),
    (r"No CUDA runtime is found, using CUDA_HOME",
     "torch.utils.cpp_extension on a host without CUDA: the CPU runtime"),
    (r"bridge_sft: (CPU runtime active|Transformer Engine is not installed)",
     "bridge-sft's own runtime notice; the header's runtime line says the same"),
    (r"MimoModelConfig is experimental and still under active development",
     "megatron-core's notice on a class it defines at import; bridge-sft does not use it"),
    (r"Function '(finetune|pretrain)' is experimental\. APIs in this module are subject to change",
     "Bridge marks its own entry points experimental; bridge-sft pins the Bridge version it calls"),
    (r"`torch\.jit\.script` is deprecated", "megatron-core's jit-scripted helpers; torch still runs them"),
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
     "megatron-core's collective calls; torch still runs them"),
    (r"`build_tokenizer` is deprecated and will be removed soon", "Bridge's own call of its tokenizer builder"),
    (r"`torch_dtype` is deprecated! Use `dtype` instead", "Bridge passes torch_dtype to transformers 5"),
    (r"GPTModel IS DEPRECATED", "megatron-core's notice on the model class Bridge 0.6.2 builds"),
    (r'The fp8 argument in "get_gpt_layer_with_transformer_engine_spec" has been deprecated',
     "Bridge 0.6.2's TE layer spec passes megatron-core's deprecated fp8 argument (None here: no fp8)"),
    (r"MCore's async save is deprecated", "printed by megatron-core when Bridge saves with its default strategy"),
    (r"Could not determine (rank|world size|local rank) from",
     "one process without torchrun: megatron-core's default, rank 0 of 1, is right"),
    (r"RerunStateMachine initialized in mode|Setting RerunStateMachine mode",
     "the rerun state machine's mode notices (its NaN/Inf and spiky-loss reports are other messages)"),
    (r"also_save_hf_checkpoint=True performs full-model HuggingFace export synchronously",
     "save_hf=true is the run's explicit choice (an HF export beside each checkpoint)"),
    (r"^test: no data \(set test_path or test_fraction\)",
     "bridge-sft's recipes hold out no test split; Bridge skips the test pass"),
    (r"Target 'bridge_sft\.[\w.]+' is not in the allowlist\. Skipping resolution",
     "Bridge reading a checkpoint's run_config.yaml (export reads only its peft section) leaves bridge-sft's "
     "classes as text"),
    (r"Could not resolve target 'megatron\.core\.optimizer\.optimizer\.MegatronOptimizer\.scale_loss'",
     "the same reading: Bridge's own run_config.yaml names a method it cannot re-import; export does not use it"),
    (r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single",
     "export reads a checkpoint in one process, which is what torch's checkpoint loader then assumes"),
    (r"The argument order of load has been changed\. Please check the document",
     "torch.distributed.checkpoint's notice on megatron-core's call"),
    (r"Please use DTensor instead and we are deprecating ShardedTensor",
     "megatron-core's checkpoint format uses ShardedTensor; torch still reads it"),
    (r"\[(\d+:)?\d\d:\d\d(<(\d+:)?\d\d:\d\d|<\?)?, +[\d.?]+ ?\w*/s\]\s*$",
     "the final state of a tqdm progress bar (encoding data, writing model shards): progress, not a warning"),
)
_HARMLESS = re.compile("|".join(f"(?:{pattern})" for pattern, _ in HARMLESS), re.M)  # one search a line

# A raw stdout line that calls itself a warning or an error (stdout is otherwise Bridge's chatter;
# stderr lines need no such mark).
_DIAGNOSTIC_LINE = re.compile(
    r"^(?:\[[^\]]*\]:?\s*)*(?:WARNING|WARN|ERROR|CRITICAL|FATAL)\b"  # level-prefixed, also "[rank0]: ERROR"
    r"|\b(?:NCCL|Gloo) (?:WARN|ERROR)\b"
    r"|Traceback \(most recent call last\)"
    r"|^\w+(?:Error|Exception|Warning)\b:"  # the last line of a traceback; a raw warning
    r"|:\d+: \w*Warning: "  # warnings.formatwarning's form (a child process's warning)
    r"|^[WEF]\d{4} \d\d:\d\d:\d\d"  # glog (torch's C++ code)
)
_ERROR_LINE = re.compile(
    r"^(?:\[[^\]]*\]:?\s*)*(?:ERROR|CRITICAL|FATAL)\b|\b(?:NCCL|Gloo) ERROR\b|Traceback \(most recent call last\)"
    r"|^\w+(?:Error|Exception)\b:|^[EF]\d{4} \d\d:\d\d:\d\d|Fatal Python error|^terminate called"
)
# Loggers whose warnings every rank shows: the rerun state machine reports NaN/Inf and spiky losses
# on the rank that saw them.
_EVERY_RANK_WARNINGS = ("megatron.core.rerun_state_machine",)


def is_harmless(text: str) -> bool:
    """True if ``text`` matches a ``HARMLESS`` pattern."""
    return _HARMLESS.search(text) is not None


class LineFilter:
    """Whether a raw output line (ANSI codes and carriage-return redraws already removed) reaches the console.

    Keeps, per stream, the decision of the last first line: a continuation inherits it (the indented
    lines of a traceback and its exception line, and on stderr any indented line: a warning's source
    line). Bridge's indented stdout lines (config dump, per-iteration lines) are lines of their own.
    """

    def __init__(self, rank: int):
        self.rank = rank
        self._inherit = {"stdout": False, "stderr": False}  # decision for continuation lines
        self._in_traceback = {"stdout": False, "stderr": False}

    def decide(self, stream: str, line: str) -> bool | None:
        """True: show ``line``; False: a diagnostic known to be harmless (hidden, to be counted);
        None: not shown, and nothing to count (a continuation or a line that is not a diagnostic)."""
        indented = line[0] in " \t"
        continuation = (self._in_traceback[stream] and not line.startswith("Traceback")
                        or indented and stream == "stderr")
        if continuation:
            show = self._inherit[stream]
            if not indented:
                self._in_traceback[stream] = False  # the exception line ends a traceback
            return True if show else None
        if stream == "stderr" and self.rank == 0:
            candidate = True
        else:
            candidate = bool((_DIAGNOSTIC_LINE if self.rank == 0 else _ERROR_LINE).search(line))
        show = candidate and not is_harmless(line)
        self._inherit[stream] = show
        self._in_traceback[stream] = line.rstrip().endswith("Traceback (most recent call last):")
        if show:
            return True
        return False if candidate else None
