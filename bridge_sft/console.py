"""What a person sees while bridge-sft trains, and the complete log behind it.

``TrainConsole`` is used by ``bridge-sft train`` and ``bridge-sft demo``:

- **The log file** (``OUTPUT_DIR/logs/rank{RANK}.log``, one per rank) receives everything
  the process writes, complete and unfiltered: file descriptors 1 and 2 are redirected
  into pipes that a thread copies to the file (so Bridge's and megatron-core's prints,
  C++ messages and child processes land there too), and Python warnings and logging
  records are written to it as they are emitted. Output produced before the log's path
  is known (imports, recipe resolution) is kept in memory and written first.
- **The console** shows a header (``describe_run``), one live progress line on a
  terminal (plain periodic lines otherwise), validation results, checkpoint saves, the
  warnings and errors that matter, and a summary. The progress figures come from
  Bridge callbacks (``Progress``), not from parsing the log.
- **What reaches the console** (on rank 0; other ranks show only errors and the rerun
  state machine's reports): every ERROR/CRITICAL record, every Python warning and
  WARNING record, every line a library writes to stderr, and every stdout line that
  calls itself a warning or error, UNLESS it matches ``HARMLESS``, the allow-list of
  messages known to be harmless (each with the reason). Anything not on that list is
  shown: a new warning is never hidden by default. Each distinct message is shown once.
- **A failure** prints the last lines of the rank's log (the traceback included) and
  the log's path, on whichever rank failed.
- ``verbose=True`` shows everything as before (and still writes the log).

Only the process that created the console reads the pipes; forked children write
into them and their output reaches the log through the parent.
"""

from __future__ import annotations

import logging
import math
import os
import re
import select
import sys
import threading
import time
import traceback
import warnings
from collections import deque
from pathlib import Path

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
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Loggers whose warnings every rank shows: the rerun state machine reports NaN/Inf and spiky losses
# on the rank that saw them.
_EVERY_RANK_WARNINGS = ("megatron.core.rerun_state_machine",)
FAILURE_TAIL_LINES = 30
PLAIN_LINE_SECONDS = 60


def is_harmless(text: str) -> bool:
    """True if ``text`` matches a ``HARMLESS`` pattern."""
    return _HARMLESS.search(text) is not None


def log_dir(config) -> Path:
    """``OUTPUT_DIR/logs``: beside the run's checkpoints (or TensorBoard logs)."""
    anchor = config.checkpoint.save or config.logger.tensorboard_dir
    return Path(anchor).parent / "logs" if anchor else Path("bridge-sft-logs")


class _RecordHandler(logging.Handler):
    """The root logger's only handler during a session: every record to the log, some to the console."""

    def __init__(self, console: "TrainConsole"):
        super().__init__(logging.NOTSET)
        self.console = console
        self.setFormatter(logging.Formatter(logging.BASIC_FORMAT))  # Bridge's format: LEVEL:name:message

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 (logging's own contract)
            self.handleError(record)
            return
        self.console._on_record(record, text)


class TrainConsole:
    """The console session of one process (see the module docstring).

    Use as a context manager around the whole command; ``open_log(directory)`` once the
    run's output folder is known. On an exception other than ``passthrough`` (user errors,
    Ctrl-C, ``SystemExit``) the console prints the failure report, swallows the exception
    and sets ``failed``; the command then exits with status 1.
    """

    def __init__(self, command: str = "train", verbose: bool = False, rank: int | None = None,
                 passthrough: tuple[type[BaseException], ...] = ()):
        self.command = command
        self.verbose = verbose
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.draws = self.rank == 0  # header, progress, summary
        self.passthrough = (KeyboardInterrupt, SystemExit, *passthrough)
        self.log_path: Path | None = None
        self.failed = False
        self.hidden = 0  # known-harmless messages not shown
        self.shown: dict[str, int] = {}
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._buffer = bytearray()  # log content before the log file is open
        self._recent: deque[str] = deque(maxlen=FAILURE_TAIL_LINES)  # when there is no log file
        self._log = None
        self._pipes: dict[int, str] = {}
        self._partial = {"stdout": "", "stderr": ""}
        self._inherit = {"stdout": False, "stderr": False}  # decision for continuation lines
        self._in_traceback = {"stdout": False, "stderr": False}
        self._active = False
        self._finished = False
        self._label_width = 12
        self._bar = None
        self._progress_task = None
        self._drawn = 0.0  # when the progress line was last redrawn

    # ------------------------------------------------------------------ session

    def __enter__(self) -> "TrainConsole":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None or issubclass(exc_type, self.passthrough):
                self.stop()
                return False
            self._log_text("".join(traceback.format_exception(exc_type, exc, tb)))
            self.stop()
            if self.verbose:
                return False  # Python prints the traceback as it always did; the log has it too
            self.failed = True
            self._failure_report(exc_type, exc)
            return True
        finally:
            self._out.close()
            self._err.close()

    def start(self) -> None:
        """Redirect fds 1 and 2 into the log (and, filtered, the console); install the hooks."""
        sys.stdout.flush()
        sys.stderr.flush()
        self._out = open(os.dup(1), "w", encoding="utf-8", errors="replace", buffering=1)
        self._err = open(os.dup(2), "w", encoding="utf-8", errors="replace", buffering=1)
        self.tty = self._out.isatty()
        same = self._err.isatty() and os.path.samestat(os.fstat(self._out.fileno()), os.fstat(self._err.fileno()))
        self._errors_to_out = same  # one terminal: warnings go through the progress display, not around it
        if self.tty:
            from rich.console import Console

            self._rich = Console(file=self._out, force_terminal=True, highlight=False, soft_wrap=True)
        self._saved_fds = {1: os.dup(1), 2: os.dup(2)}
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.dup2(write, fd)
            os.close(write)
            self._pipes[read] = stream
        self._line_buffering = getattr(sys.stdout, "line_buffering", None)
        if self._line_buffering is False:
            sys.stdout.reconfigure(line_buffering=True)  # prints reach the log (and a failure's tail) at once
        self._active = True
        self._reader = threading.Thread(target=self._pump, name="bridge-sft-console", daemon=True)
        self._reader.start()
        if not self.verbose:
            self._saved_showwarning = warnings.showwarning
            warnings.showwarning = self._on_warning
            root = logging.getLogger()
            self._saved_root = (root.handlers[:], root.level)
            for handler in root.handlers[:]:
                root.removeHandler(handler)
            self._handler = _RecordHandler(self)
            root.addHandler(self._handler)  # megatron's later logging.basicConfig(...) is then a no-op
            root.setLevel(logging.INFO)  # as that basicConfig would

    def stop(self) -> None:
        """Stop the progress line, drain the pipes into the log, restore the process's fds and hooks."""
        if not self._active:
            return
        self.end_progress()
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved_fds.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._active = False  # the reader drains what is left and stops
        self._reader.join(timeout=5)
        with self._lock:
            for read in list(self._pipes):
                os.close(read)
            self._pipes.clear()
            for stream, rest in self._partial.items():
                if rest:
                    self._raw_line(stream, rest)
                    self._partial[stream] = ""
        if self._line_buffering is False:
            sys.stdout.reconfigure(line_buffering=False)
        if not self.verbose:
            warnings.showwarning = self._saved_showwarning
            root = logging.getLogger()
            root.removeHandler(self._handler)
            handlers, level = self._saved_root
            for handler in handlers:
                root.addHandler(handler)
            root.setLevel(level)
        with self._lock:
            self._finished = True
            if self._log is not None:
                self._log.close()
                self._log = None

    def configure(self, config) -> None:
        """Bridge settings for a console session: keep WARNING records (Bridge's ``logger.filter_warnings``
        drops them all; here every warning goes to the log and the allow-list decides what is shown)."""
        if not self.verbose:
            config.logger.filter_warnings = False

    def open_log(self, directory: str | Path) -> Path:
        """Write the log to ``directory/rank{RANK}.log`` (appended: a resumed run keeps its history)."""
        with self._lock:
            path = Path(directory) / f"rank{self.rank}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(path, "ab", buffering=0)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self._log.write(f"===== bridge-sft {self.command}, rank {self.rank}, pid {os.getpid()}, {stamp} =====\n"
                            .encode())
            self._log.write(bytes(self._buffer))
            self._buffer.clear()
            self.log_path = path
        return path

    # ------------------------------------------------------------------ what the person sees

    def say(self, text: str = "", style: str | None = None, error: bool = False) -> None:
        """Print a line on the console (above the progress line on a terminal); also to the log."""
        self._log_text(text + "\n")
        self._show(text, style=style, error=error)

    def warn(self, text: str) -> None:
        """A warning line on the console, shown once per distinct text (counted after that)."""
        self._show_once(text, style="yellow", error=True)

    def _show_once(self, text: str, style: str | None = None, error: bool = False) -> None:
        with self._lock:
            self.shown[text] = self.shown.get(text, 0) + 1
            if self.shown[text] == 1:
                self._show(text if self.rank == 0 else f"[rank {self.rank}] {text}", style=style, error=error)

    def _show(self, text: str, style: str | None = None, error: bool = False) -> None:
        if not hasattr(self, "_out"):
            print(text, file=sys.stderr if error else sys.stdout, flush=True)
            return
        with self._lock:
            if self.tty and (not error or self._errors_to_out):
                self._rich.print(text, style=style, markup=False, highlight=False, soft_wrap=True)
            else:
                stream = self._err if error else self._out
                stream.write(text + "\n")
                stream.flush()

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        """``title`` and aligned ``label  value`` lines (the header, the summary)."""
        if not self.draws:
            return
        self.say(title, style="bold")
        self._label_width = max([len(label) for label, _ in rows] + [self._label_width])
        for label, value in rows:
            self.row(label, value)

    def row(self, label: str, value: str) -> None:
        """One ``label  value`` line, aligned with the last ``table``."""
        if self.draws:
            self.say(f"  {label.ljust(self._label_width)}  {value}")

    # ------------------------------------------------------------------ progress

    def start_status(self, text: str) -> None:
        """A transient spinner with ``text`` on a terminal until the next status, progress line or stop."""
        if not self.draws or self.verbose or not self.tty:
            return
        from rich.live import Live
        from rich.spinner import Spinner

        with self._lock:
            self.end_progress()
            self._bar = Live(Spinner("dots", text=text, style="bold"), console=self._rich, transient=True,
                             refresh_per_second=8, redirect_stdout=False, redirect_stderr=False)
            self._bar.start()

    def start_progress(self, total: int, done: int, description: str = "train") -> None:
        if not self.draws or self.verbose or not self.tty:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        with self._lock:
            self.end_progress()
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24),
                                 MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), console=self._rich,
                                 auto_refresh=False, transient=False, redirect_stdout=False, redirect_stderr=False)
            self._progress_task = self._bar.add_task(description, total=total, completed=done, stats="")
            self._bar.start()
            self._bar.refresh()

    def update_progress(self, done: int, stats: str, plain_line: str | None) -> None:
        """Move the live line to ``done`` with ``stats`` (terminal); print ``plain_line`` (no terminal)."""
        if not self.draws or self.verbose:
            return
        if self._progress_task is not None:
            with self._lock:
                self._bar.update(self._progress_task, completed=done, stats=stats)
                now = time.monotonic()
                if now - self._drawn >= 0.1 or done == self._bar.tasks[0].total:  # at most 10 redraws a second
                    self._bar.refresh()
                    self._drawn = now
        elif not self.tty and plain_line is not None:
            self._show(plain_line)

    def end_progress(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.refresh()
                self._bar.stop()
                self._bar = self._progress_task = None

    # ------------------------------------------------------------------ the log and the filters

    def _log_text(self, text: str) -> None:
        """Append ``text`` to the log after whatever the pipes already hold (so the order is kept)."""
        if os.getpid() != self._pid:  # a forked child: through the pipe, to the parent's reader
            sys.stderr.write(text)
            return
        with self._lock:
            if self._active:
                self._drain()
            self._write_log(text.encode("utf-8", "replace"))

    def _write_log(self, data: bytes) -> None:
        if self._finished:
            return
        if self._log is not None:
            self._log.write(data)
        else:
            self._buffer += data
            if len(self._buffer) > 64 << 20:  # imports never print this much; keep the newest part
                del self._buffer[: len(self._buffer) - (32 << 20)]

    def _pump(self) -> None:
        """Reader thread: copy the pipes to the log and pass their lines to the filter."""
        while True:
            with self._lock:
                pipes = list(self._pipes)
            if not pipes:
                return
            try:
                ready, _, _ = select.select(pipes, [], [], 0.1)
            except (OSError, ValueError):  # closed by stop() after its timeout
                return
            with self._lock:
                got = self._drain(ready)
            if not got and not self._active:
                return

    def _drain(self, ready: list[int] | None = None) -> bool:
        """Read what the pipes hold now (caller holds the lock). True if anything was read."""
        got = False
        for read in list(ready if ready is not None else self._pipes):
            if read not in self._pipes:
                continue
            while True:
                try:
                    data = os.read(read, 1 << 16)
                except BlockingIOError:
                    break
                if not data:  # every writer closed it
                    break
                got = True
                self._write_log(data)
                if self.verbose:
                    target = self._out if self._pipes[read] == "stdout" else self._err
                    target.write(data.decode("utf-8", "replace"))
                    target.flush()
                self._lines(self._pipes[read], data.decode("utf-8", "replace"))
        return got

    def _lines(self, stream: str, text: str) -> None:
        text = self._partial[stream] + text
        *lines, self._partial[stream] = text.split("\n")
        for line in lines:
            self._raw_line(stream, line)

    def _raw_line(self, stream: str, line: str) -> None:
        """Decide whether a raw output line reaches the console (see the module docstring)."""
        line = _ANSI.sub("", line.rstrip("\r").rsplit("\r", 1)[-1])  # the last redraw of a \r progress line
        self._recent.append(line)
        if self.verbose or not line.strip():
            return
        # A continuation inherits its first line's decision: the indented lines of a traceback and its
        # exception line, and on stderr any indented line (a warning's source line). Bridge's indented
        # stdout lines (config dump, per-iteration lines) are lines of their own.
        indented = line[0] in " \t"
        continuation = (self._in_traceback[stream] and not line.startswith("Traceback")
                        or indented and stream == "stderr")
        if continuation:
            show = self._inherit[stream]
            if not indented:
                self._in_traceback[stream] = False  # the exception line ends a traceback
        else:
            if stream == "stderr" and self.rank == 0:
                candidate = True
            else:
                candidate = bool((_DIAGNOSTIC_LINE if self.rank == 0 else _ERROR_LINE).search(line))
            show = candidate and not is_harmless(line)
            if candidate and not show:
                self.hidden += 1
            self._inherit[stream] = show
            self._in_traceback[stream] = line.rstrip().endswith("Traceback (most recent call last):")
        if show:
            self._show(line, error=True)

    def _on_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """``warnings.showwarning`` during a session."""
        text = warnings.formatwarning(message, category, filename, lineno, line)
        if os.getpid() != self._pid:
            sys.stderr.write(text)
            return
        self._log_text(text)
        if is_harmless(str(message)):
            self.hidden += 1
        elif self.rank == 0:
            self._show_once(f"warning: {category.__name__}: {message} ({_short(filename)}:{lineno})", style="yellow",
                            error=True)

    def _on_record(self, record: logging.LogRecord, text: str) -> None:
        if os.getpid() != self._pid:
            sys.stderr.write(text + "\n")
            return
        self._log_text(text + "\n")
        if record.levelno >= logging.ERROR:
            where = " (traceback in the log)" if record.exc_info else ""
            self._show_once(f"{record.levelname.lower()}: {record.getMessage()}{where}", style="bold red", error=True)
        elif record.levelno >= logging.WARNING:
            if is_harmless(record.getMessage()):
                self.hidden += 1
            elif self.rank == 0 or record.name.startswith(_EVERY_RANK_WARNINGS):
                self._show_once(f"warning ({record.name}): {record.getMessage()}", style="yellow", error=True)

    # ------------------------------------------------------------------ failure

    def tail(self, n: int = FAILURE_TAIL_LINES) -> list[str]:
        """The last ``n`` lines of this rank's log (what is kept in memory if there is no log file)."""
        if self.log_path is None or not self.log_path.exists():
            return list(self._recent)[-n:]
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - (1 << 20)))
            text = f.read().decode("utf-8", "replace")
        lines = [_ANSI.sub("", line.rsplit("\r", 1)[-1]) for line in text.splitlines()]
        return lines[-n:]

    def _failure_report(self, exc_type, exc) -> None:
        where = f"rank {self.rank}" + (f" (pid {os.getpid()})" if self.rank == 0 else "")
        self._show(f"bridge-sft {self.command} failed on {where}: {exc_type.__name__}: {exc}", style="bold red",
                   error=True)
        lines = self.tail()
        source = self.log_path or "this process's output"
        self._show(f"last {len(lines)} lines of {source}:", error=True)
        for line in lines:
            self._show(f"  | {line}", error=True)
        if self.log_path is not None:
            self._show(f"full log: {self.log_path}", style="bold", error=True)


def _short(path: str) -> str:
    """``site-packages/x/y.py`` -> ``x/y.py``."""
    return path.split("site-packages/", 1)[-1]


# ---------------------------------------------------------------------------- the header


def describe_run(config, data_summary: dict | list[dict] | None = None,
                 hf_path: str | None = None) -> list[tuple[str, str]]:
    """Header rows (label, text) of a training run: model, data, training, parallelism, runtime, outputs."""
    model = config.model
    source = hf_path or config.checkpoint.pretrained_checkpoint or "?"
    arch = _architecture(source) or type(model).__name__
    shape = (f"{model.num_layers} layers, hidden {model.hidden_size}, {model.num_attention_heads} heads "
             f"({model.num_query_groups or model.num_attention_heads} kv), vocab {model.vocab_size:,}")
    rows = [("model", f"{arch} ({shape}) from {source}")]
    if config.peft is not None:
        peft = config.peft
        targets = ", ".join(getattr(peft, "target_modules", []))
        rows.append(("fine-tuning", f"{type(peft).__name__} (dim {getattr(peft, 'dim', '?')}, alpha "
                                    f"{getattr(peft, 'alpha', '?')}) on {targets}"))
    if data_summary is not None:
        rows.append(("data", describe_data(data_summary, config.dataset)))
    train, dataset = config.train, config.dataset
    unit = "packs" if getattr(dataset, "packing", False) else "samples"
    sched = config.scheduler
    iterations = f"{train.train_iters:,}" if train.train_iters else "?"
    optimizer = config.optimizer
    rows.append(("training", f"{iterations} iterations x {train.global_batch_size} {unit} of {model.seq_length} "
                             f"tokens (micro-batch {train.micro_batch_size}); lr {optimizer.lr} "
                             f"{sched.lr_decay_style} to {optimizer.min_lr}, {sched.lr_warmup_iters} warm-up"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp, cp = model.tensor_model_parallel_size, model.pipeline_model_parallel_size, model.context_parallel_size
    extras = [name for name, on in (("sequence parallel", model.sequence_parallel),
                                    ("distributed optimizer", config.ddp.use_distributed_optimizer)) if on]
    rows.append(("parallelism", f"{world} process{'es' if world > 1 else ''}: TP {tp}, PP {pp}, CP {cp}, "
                                f"DP {max(world // (tp * pp * cp), 1)}" + "".join(f", {e}" for e in extras)))
    precision = "bf16-mixed" if model.bf16 else "fp16-mixed" if model.fp16 else "fp32"
    rows.append(("runtime", f"{precision}; {runtime_description()}"))
    checkpoint = config.checkpoint
    if checkpoint.save:
        hf = "" if not checkpoint.also_save_hf_checkpoint else \
            ", HF export beside each" if config.peft is None else ", LoRA adapter (HF PEFT) and tokenizer beside each"
        every = f"every {checkpoint.save_interval} iterations and " if checkpoint.save_interval else ""
        rows.append(("checkpoints", f"{checkpoint.save} ({every}at the end{hf})"))
    if config.logger.tensorboard_dir:
        rows.append(("TensorBoard", config.logger.tensorboard_dir))
    return rows


def describe_data(summary: dict | list[dict], dataset=None) -> str:
    """One line: sources, samples, tokens, supervised tokens, and what was cut or skipped.
    ``summary``: the data's, or one per source of a mixture (added up; the sources named)."""
    if isinstance(summary, list):
        names = ", ".join(spec.name for spec in dataset.sources()) if hasattr(dataset, "sources") else "data"
        summary = _add_summaries(summary)
    else:
        paths = getattr(dataset, "data_path", None)
        paths = [paths] if isinstance(paths, str) else list(paths or [])
        names = ", ".join(Path(p).name for p in paths) or "data"
    text = (f"{names}: {summary.get('samples', 0):,} samples, {summary.get('tokens', 0):,} tokens "
            f"({summary.get('supervised_tokens', 0):,} supervised)")
    cut = {"truncated": summary.get("truncated", 0), "dropped": summary.get("dropped_too_long", 0)
           + summary.get("dropped_no_supervised_after_truncation", 0),
           "bad records skipped": sum((summary.get("skipped") or {}).values())}
    text += "".join(f", {n:,} {what}" for what, n in cut.items() if n)
    validation = getattr(dataset, "validation_path", None)
    fraction = getattr(dataset, "validation_fraction", 0)
    if validation:
        text += f"; validation: {validation}"
    elif fraction:
        text += f"; {fraction:.0%} held out for validation"
    return text


def _add_summaries(summaries: list[dict]) -> dict:
    """The counts ``describe_data`` shows, added up over the sources of a mixture."""
    total: dict = {"skipped": {}}
    for summary in summaries:
        summary = getattr(summary, "summary", summary)
        for key in ("samples", "tokens", "supervised_tokens", "truncated", "dropped_too_long",
                    "dropped_no_supervised_after_truncation"):
            total[key] = total.get(key, 0) + summary.get(key, 0)
        for reason, n in (summary.get("skipped") or {}).items():
            total["skipped"][reason] = total["skipped"].get(reason, 0) + n
    return total


def runtime_description() -> str:
    """Device and layer implementation, e.g. ``CPU (gloo), no Transformer Engine: its layers in plain torch``."""
    import importlib.util

    import torch

    from bridge_sft import runtime

    if runtime.is_enabled():
        device = "CPU (gloo)"
    elif torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()} per node"
    else:
        device = "CPU"
    has_te = importlib.util.find_spec("transformer_engine") is not None
    return f"{device}, " + ("Transformer Engine" if has_te else "no Transformer Engine: its layers in plain torch")


def _architecture(source: str) -> str | None:
    import json

    config = Path(source) / "config.json"
    try:
        return json.loads(config.read_text())["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------- the Bridge callback


def _progress_callback_class():
    """``Progress`` needs Bridge at import time; ``bridge_sft.console`` itself must import without it."""
    import torch

    from bridge_sft.callbacks import TokenThroughput
    from megatron.bridge.training.callbacks import Callback
    from megatron.core import parallel_state

    def device():
        from bridge_sft import runtime

        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not \
            runtime.is_enabled() else torch.device("cpu")

    def from_last_stage(values: list[float]) -> list[float]:
        """The last pipeline stage's ``values`` (losses exist only there); one broadcast if PP > 1."""
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device())
        torch.distributed.broadcast(tensor, src=torch.distributed.get_world_size() - 1)
        return tensor.tolist()

    def count_parameters(model, moe: bool) -> tuple[int, int]:
        """(total, trainable) parameters of the whole model, over every tensor/pipeline/expert shard."""
        counts = torch.zeros(4, dtype=torch.float64)  # dense total, dense trainable, expert total, trainable
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        etp_rank = parallel_state.get_expert_tensor_parallel_rank()
        for chunk in model:
            for param in chunk.parameters():
                if getattr(param, "shared", False):  # the copy of tied embeddings on the last pipeline stage
                    continue
                expert = not getattr(param, "allreduce", True)
                if not getattr(param, "tensor_model_parallel", False) and (etp_rank if expert else tp_rank) != 0:
                    continue  # replicated across tensor-parallel ranks: count it once
                counts[2 * expert] += param.numel()
                counts[2 * expert + 1] += param.numel() if param.requires_grad else 0
        counts = counts.to(device())
        dense, experts = counts[:2].clone(), counts[2:].clone()
        torch.distributed.all_reduce(dense, group=parallel_state.get_model_parallel_group())
        if moe:  # every rank takes part, with or without experts of its own
            group = parallel_state.get_expert_tensor_model_pipeline_parallel_group()
            torch.distributed.all_reduce(experts, group=group)
        total = dense + experts
        return int(total[0]), int(total[1])

    class Progress(Callback):
        """Progress line, validation results and checkpoint saves on the console, from Bridge's callbacks.

        Per step: the loss (mean over the last ``logger.log_interval`` iterations, as Bridge's
        log line), learning rate, grad norm, supervised tokens/s over the same window (from
        ``TokenThroughput``), ETA from wall time. Without a terminal, a plain line at log
        intervals: about 20 per run, and at least one a minute. Keeps ``train`` and
        ``validation`` (``{iteration: lm loss}``) and ``totals`` (as ``TokenThroughput.totals``).
        """

        def __init__(self, console: TrainConsole, throughput: TokenThroughput):
            self.console = console
            self.throughput = throughput
            self.train: dict[int, float] = {}
            self.validation: dict[int, float] = {}
            self.parameters: tuple[int, int] | None = None
            # as TokenThroughput.totals, but on every rank (the last pipeline stage's counts)
            self.totals = {"supervised_tokens": 0.0, "slot_tokens": 0.0, "seconds": 0.0, "steps": 0}
            self.skipped = 0
            self._training = False
            self.merge_command: str | None = None  # a LoRA run's: how to get the merged HF model

        def on_train_start(self, context) -> None:
            self.parameters = count_parameters(context.model, bool(getattr(context.state.cfg.model,
                                                                            "num_moe_experts", None)))
            state = context.state
            self.total = state.cfg.train.train_iters
            self.interval = state.cfg.logger.log_interval or 1
            # Plain lines (no terminal): at log intervals, about 20 per run, and at least one a minute.
            self.plain_every = self.interval * max(1, math.ceil(self.total / 20 / self.interval))
            self._last_plain = time.perf_counter()
            self.first = state.train_state.step
            self._window: deque = deque(maxlen=self.interval)
            self._clock: tuple[int, float] | None = None
            self._training = True
            total, trainable = self.parameters
            share = "all trainable" if trainable == total else f"{trainable:,} trainable, {trainable / total:.2%}"
            self.console.row("parameters", f"{total:,} ({share})")
            if self.first:
                self.console.row("resuming", f"from iteration {self.first}")
            self.console.start_progress(self.total, self.first)

        def on_train_step_end(self, context) -> None:
            iteration = context.state.train_state.step + 1  # Bridge counts the step after the callbacks
            loss = context.loss_dict.get("lm loss") if context.loss_dict else None
            supervised, slots, seconds = self.throughput.last_step
            loss, supervised, slots = from_last_stage([math.nan if loss is None else float(loss), supervised, slots])
            for key, value in (("supervised_tokens", supervised), ("slot_tokens", slots), ("seconds", seconds)):
                self.totals[key] += value
            self.totals["steps"] += 1
            now = time.perf_counter()
            self.skipped += bool(context.skipped_iter)
            if not context.skipped_iter:
                self.train[iteration] = loss
                self._window.append((loss, supervised, seconds))
            if not self.console.draws:
                return
            if not math.isfinite(loss) and not context.skipped_iter:
                self.console.warn(f"iteration {iteration}: the loss is {loss}")
            if self._clock is None:  # ETA from the wall time after the first step (data and graph warm-up)
                self._clock = (iteration, now)
            done, start = self._clock
            eta = (self.total - iteration) * (now - start) / (iteration - done) if iteration > done else None
            lr = next((g["lr"] for g in context.optimizer.param_groups if not g.get("is_decoupled_lr")), None)
            window_loss = sum(w[0] for w in self._window) / len(self._window) if self._window else math.nan
            rate = sum(w[1] for w in self._window) / max(sum(w[2] for w in self._window), 1e-9)
            grad = context.grad_norm
            fields = [f"loss {window_loss:.4f}", f"lr {lr:.3e}" if lr is not None else "",
                      f"grad norm {grad:.3f}" if grad is not None else "", f"{rate:,.0f} supervised tokens/s"]
            if self.skipped:
                fields.append(f"{self.skipped} skipped")
            eta_text = format_duration(eta) if eta is not None else "?"
            plain = None
            due = iteration % self.plain_every == 0 or now - self._last_plain > PLAIN_LINE_SECONDS
            if iteration % self.interval == 0 and due or iteration == self.total:
                self._last_plain = now
                width = len(str(self.total))
                plain = f"iteration {iteration:>{width}}/{self.total} | " + " | ".join(filter(None, fields)) \
                    + f" | ETA {eta_text}"
            stats = "  ".join(filter(None, fields)).replace("supervised tokens/s", "sup. tok/s") + f"  ETA {eta_text}"
            self.console.update_progress(iteration, stats, plain)

        def on_eval_end(self, context) -> None:
            losses = context.total_loss_dict or {}
            (loss,) = from_last_stage([float(losses["lm loss"]) if "lm loss" in losses else math.nan])
            iteration = context.state.train_state.step
            self.validation[iteration] = loss
            if self.console.draws and not math.isnan(loss):
                when = f"at iteration {iteration}" if self._training else f"after training (iteration {iteration})"
                self.console.say(f"validation {when}: loss {loss:.4f} (perplexity {math.exp(min(loss, 700)):,.1f})")

        def on_checkpoint_save(self, context) -> None:
            if self.console.draws:
                state = context.state
                path = Path(state.cfg.checkpoint.save) / f"iter_{state.train_state.step:07d}"
                hf = " (with the HF export in hf/)" if state.cfg.checkpoint.also_save_hf_checkpoint else ""
                if state.cfg.peft is not None:
                    hf = " (with the LoRA adapter and tokenizer in hf/)" if hf else ""
                    self.merge_command = f"bridge-sft convert export {state.cfg.checkpoint.save} OUT_DIR"
                self.console.say(f"checkpoint saved at iteration {state.train_state.step}: {path}{hf}")

        def on_train_end(self, context) -> None:
            self._training = False
            self.console.end_progress()

    return Progress


def progress_callbacks(console: TrainConsole) -> list:
    """``[TokenThroughput, Progress]`` for ``bridge_sft.train.run(callbacks=...)``; the Progress is last."""
    from bridge_sft.callbacks import TokenThroughput

    throughput = TokenThroughput()
    return [throughput, _progress_callback_class()(console, throughput)]


def summary_rows(progress, console: TrainConsole) -> list[tuple[str, str]]:
    """The summary's rows after ``run()``: losses, throughput, the log (and how much it held back)."""
    rows, totals = [], progress.totals
    train = [progress.train[k] for k in sorted(progress.train)]
    if train:
        rows.append(("train loss", f"{train[0]:.4f} -> {train[-1]:.4f} (per iteration)"))
    validation = [progress.validation[k] for k in sorted(progress.validation)]
    if validation:
        rows.append(("validation loss", f"{validation[0]:.4f} -> {validation[-1]:.4f}"))
    if totals.get("seconds"):
        rows.append(("supervised tokens/s", f"{totals['supervised_tokens'] / totals['seconds']:,.0f} "
                     f"({totals['supervised_tokens']:,.0f} supervised tokens of {totals['slot_tokens']:,.0f} slots)"))
    if getattr(progress, "merge_command", None):
        rows.append(("merged model", f"{progress.merge_command} (the LoRA adapters merged into the base weights, "
                                     "as an HF checkpoint)"))
    if console.log_path is not None:
        held = f" ({console.hidden} known-harmless warnings not shown)" if console.hidden else ""
        rows.append(("full log", f"{console.log_path}{held}"))
    return rows
