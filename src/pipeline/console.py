"""What the command line shows while it works: log lines and progress, on stderr, readable together.

* :func:`console_logging` installs one handler for the whole process, so every record is printed once:
  libraries that bring their own console handler (huggingface_hub does) hand their records to it instead.
  While the progress bar is on screen, lines are written above them (``tqdm.write``) instead of into them.
* :class:`ConsoleProgress` turns the pipeline's :class:`~.progress.Progress` events into one bar for the
  whole input (frames, elapsed time, ETA, and the running phase with its steps) that stays on screen at
  the end.  Without a terminal (a log file, a pipe) it logs one line per phase instead.

Nothing here imports torch: the command line sets this up before the pipeline is imported.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from typing import IO, Iterable, Iterator, Sequence

from ..progress import Progress

log = logging.getLogger("seedvr2")

# The loggers whose INFO lines the command line shows; everything else from WARNING up.
OWN_LOGGERS = ("seedvr2", "src", "__main__")
# Libraries that attach a console handler of their own at import; their records go through ours instead.
ADOPTED_LOGGERS = ("huggingface_hub",)

# Share of a chunk's time each phase takes, for the bar's position inside a chunk: the earlier node pack's
# weights, close to the phase times in docs/performance.md (decode the longest, the alpha channel short).
# Chunk boundaries do not depend on them.
PHASE_WEIGHTS = {"encode": 0.2, "upscale": 0.25, "decode": 0.5, "postprocess": 0.05}


class _Formatter(logging.Formatter):
    """The message alone; warnings and errors say so in front, unless the message already does."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            prefix = "error: " if record.levelno >= logging.ERROR else "warning: "
            if not text.lower().startswith(("error:", "warning:")):
                text = prefix + text
        return text


class ConsoleHandler(logging.Handler):
    """Writes each record as one line to ``stream`` (``sys.stderr`` when None, looked up per record),
    above the progress bar while it is shown."""

    def __init__(self, stream: IO[str] | None = None):
        super().__init__()
        self._stream = stream
        self.bars_active = False
        self.setFormatter(_Formatter("%(message)s"))

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr

    def write(self, text: str) -> None:
        """Print ``text`` (one or more lines) without breaking the bar."""
        stream = self.stream
        if self.bars_active:
            from tqdm import tqdm

            tqdm.write(text, file=stream)
        else:
            stream.write(text + "\n")
        stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the pipeline
            self.handleError(record)


@contextmanager
def console_logging(debug: bool = False, stream: IO[str] | None = None) -> Iterator[ConsoleHandler]:
    """Route every log record of the process through one :class:`ConsoleHandler` until the block ends.

    Our loggers show INFO (DEBUG with ``debug``), other libraries WARNING and up; Python warnings are
    logged too.  The previous logging setup is restored afterwards (tests call the CLI in-process).
    """
    root = logging.getLogger()
    handler = ConsoleHandler(stream)
    saved_levels = {name: logging.getLogger(name).level for name in ("", *OWN_LOGGERS)}
    adopted = _adopt_library_handlers()
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)
    logging.captureWarnings(True)
    try:
        yield handler
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        for logger, handlers in adopted:
            for h in handlers:
                logger.addHandler(h)


def _adopt_library_handlers() -> list[tuple[logging.Logger, list[logging.Handler]]]:
    """Detach the console handlers that libraries add to their own loggers (their records still reach the
    root handler), so a warning is not printed once by the library and once by us.  The library is
    imported first: its handler is attached at import."""
    adopted = []
    for name in ADOPTED_LOGGERS:
        try:
            __import__(f"{name}.utils.logging")
        except ImportError:
            continue
        logger = logging.getLogger(name)
        handlers = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]
        for h in handlers:
            logger.removeHandler(h)
        logger.propagate = True
        adopted.append((logger, handlers))
    return adopted


def _terminal_size(stream: IO[str]) -> tuple[int, int]:
    """Columns and lines of the terminal behind ``stream``; a pseudo-terminal may report 0 (then $COLUMNS /
    $LINES or 100 x 24), which would make tqdm draw nothing."""
    try:
        columns, lines = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        columns = lines = 0
    fallback = shutil.get_terminal_size((100, 24))
    return columns or fallback.columns, lines or fallback.lines


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class ConsoleProgress(Progress):
    """Progress of one input on the console: one bar in frames, with the running phase and its steps.

    The command line announces each chunk of frames (:meth:`begin_chunk`) before the pipeline works on it;
    the pipeline's phase events then move the bar through the chunk by :data:`PHASE_WEIGHTS`, so it never
    waits at 0 % for a whole phase.  ``total_frames`` may be 0 when the input does not say how many frames it
    holds (no ETA then).  One line only: several tqdm lines redrawn in place break in many consoles.
    """

    def __init__(self, label: str, total_frames: int, handler: ConsoleHandler, *,
                 phases: Sequence[str] = ("encode", "upscale", "decode"), bars: bool | None = None,
                 refresh_seconds: float = 0.5):
        self.label = label
        self.total = max(int(total_frames), 0)
        self.handler = handler
        self.bars = handler.stream.isatty() if bars is None else bars
        self._weights = {p: PHASE_WEIGHTS.get(p, 0.0) for p in phases}
        self._chunk_weight = sum(self._weights.values()) or 1.0
        self._done = 0              # frames of the finished chunks
        self._chunk = 0             # frames of the chunk being worked on
        self._finished_phases: set[str] = set()
        self._phase: str | None = None
        self._phase_total = 0
        self._phase_steps = 0
        self._start = time.monotonic()
        self._bar = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._refresh_seconds = refresh_seconds
        if self.bars:
            self._open_bar()

    # ------------------------------------------------------------------------------------- the CLI's side
    def chunks(self, chunks: Iterable) -> Iterator:
        """Pass ``chunks`` (frame tensors) through, announcing each one."""
        for chunk in chunks:
            self.begin_chunk(int(chunk.shape[0]))
            yield chunk

    def begin_chunk(self, frames: int) -> None:
        """The pipeline is about to work on ``frames`` more input frames; the previous chunk is done."""
        self._done += self._chunk
        self._chunk = frames
        self._finished_phases.clear()
        self._phase = None
        if self.total and self._done + frames > self.total:
            self._set_total(self._done + frames)  # the container's frame count was an estimate
        self._show()

    def finish(self) -> None:
        """Everything was processed: fill the bar and leave it on screen."""
        self._done += self._chunk
        self._chunk = 0
        self._phase = None
        if self.total != self._done:  # fewer frames than announced (a capped or estimated count)
            self._set_total(self._done)
        self._show()
        self.close()

    def close(self) -> None:
        """Stop drawing; the bar stays on screen as it is (where a failure or an interrupt left it)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self._bar is not None:
            self._bar.refresh()
            self._bar.close()
            self._bar = None
        self.handler.bars_active = False

    # -------------------------------------------------------------------------------- the pipeline's side
    def start_phase(self, phase: str, total: int, **details) -> None:
        if self._phase is not None and self._phase != phase:
            self._finished_phases.add(self._phase)
        self._phase, self._phase_total, self._phase_steps = phase, max(int(total), 0), 0
        if not self.bars:
            self._log_phase()
        self._show()

    def advance(self, steps: int = 1, **details) -> None:
        self._phase_steps += steps
        self._show()

    # ------------------------------------------------------------------------------------------- drawing
    def frames_done(self) -> float:
        """Input frames done so far, counting the running chunk by the phases it has been through."""
        if not self._chunk:
            return float(self._done)
        weight = sum(w for p, w in self._weights.items() if p in self._finished_phases and p != self._phase)
        if self._phase is not None and self._phase_total:
            weight += self._weights.get(self._phase, 0.0) * min(self._phase_steps / self._phase_total, 1.0)
        return self._done + self._chunk * min(weight / self._chunk_weight, 1.0)

    def phase_text(self) -> str:
        """The running phase and its steps, e.g. "decode 3/7"."""
        if self._phase is None:
            return ""
        return f"{self._phase} {self._phase_steps}/{self._phase_total}" if self._phase_total else self._phase

    def _set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total or None

    def _open_bar(self) -> None:
        from tqdm import tqdm

        stream = self.handler.stream
        columns, lines = _terminal_size(stream)
        counts = "{n:.1f}/{total:.0f} frames" if self.total else "{n:.1f} frames"
        # The frames are fractional inside a chunk: the phase weights place the bar between chunks.
        bar_format = ("{desc}: {percentage:3.0f}%|{bar}| " + counts + " [{elapsed}<{remaining}{postfix}]"
                      if self.total else "{desc}: " + counts + " [{elapsed}{postfix}]")
        self._bar = tqdm(total=self.total or None, desc=self.label, file=stream, leave=True, smoothing=0,
                         ncols=columns, nrows=lines, bar_format=bar_format)
        self.handler.bars_active = True
        # A step inside a phase can take long: keep the clock moving so the screen never looks frozen.
        self._ticker = threading.Thread(target=self._tick, name="seedvr2-progress", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self._refresh_seconds):
            self._show()

    def _show(self) -> None:
        bar = self._bar
        if bar is None:
            return
        bar.n = self.frames_done()
        bar.set_postfix_str(self.phase_text(), refresh=False)
        bar.refresh()

    def _log_phase(self) -> None:
        done, elapsed = self.frames_done(), time.monotonic() - self._start
        where = f"{100 * done / self.total:.0f} % of {self.total} frame(s)" if self.total else f"{done:.1f} frames"
        eta = ""
        if self.total and done > 0:
            eta = f", about {_clock(elapsed * (self.total - done) / done)} left"
        steps = f" ({self._phase_total} steps)" if self._phase_total > 1 else ""
        log.info("%s: %s%s; %s done, %s elapsed%s", self.label, self._phase, steps, where, _clock(elapsed), eta)
