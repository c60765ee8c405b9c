"""Pipeline progress shown on the ComfyUI node, and the user's "Cancel" reaching the pipeline."""
from __future__ import annotations

import logging
import time

from ..src.progress import Progress

try:
    import comfy.model_management as model_management
    import comfy.utils as comfy_utils
except ImportError:  # not running inside ComfyUI: progress and interrupts are no-ops
    comfy_utils = model_management = None

log = logging.getLogger("seedvr2")

PHASE_TITLES = {"encode": "encoding", "upscale": "upscaling (DiT)", "decode": "decoding",
                "postprocess": "alpha channel"}


def _text_sender():
    """``send(text)`` showing a line of text on the executing node (ComfyUI's progress text, since 0.3.40),
    or None where this ComfyUI has no such message."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return None
    server = getattr(PromptServer, "instance", None)
    context = get_executing_context()
    if server is None or context is None or not hasattr(server, "send_progress_text"):
        return None
    node_id = context.node_id
    return lambda text: server.send_progress_text(text, node_id)


class ComfyProgress(Progress):
    """One node progress bar for the whole run, each phase owning a share of it.

    The shares follow where the time goes on a GPU (decode is the slowest phase).  Within a phase the
    bar moves per step (batch) and inside a step as the pipeline's inner loops report (DiT blocks; the
    VAE's levels, chunks, pieces and bands).  The bar never moves back, even if a phase is started again.
    The phase and the batch in progress are named on the node (ComfyUI's progress text); the log gets a
    line per phase with its number of batches.
    """

    PHASE_WEIGHTS = {"encode": 0.2, "upscale": 0.25, "decode": 0.5, "postprocess": 0.05}
    BAR_STEPS = 1000
    FREE_UPDATES = 8
    MIN_INTERVAL_S = 0.02
    MIN_MOVE = 3

    def __init__(self):
        # ComfyUI attaches the bar to the node that is executing.
        self._bar = comfy_utils.ProgressBar(self.BAR_STEPS) if comfy_utils else None
        self._send_text = _text_sender() if comfy_utils else None
        self._fraction_done = {phase: 0.0 for phase in self.PHASE_WEIGHTS}
        self._phase: str | None = None
        self._phase_total = 0
        self._phase_steps = 0
        self._label = ""
        self.position = 0
        self._shown = -1
        self._last_shown = 0.0
        self._step_updates = 0

    def start_phase(self, phase: str, total: int) -> None:
        """A phase ("encode", "upscale", "decode", "postprocess") begins with ``total`` steps."""
        self._phase, self._phase_total, self._phase_steps = phase, max(int(total), 0), 0
        self._step_updates = 0
        log.info("SeedVR2: %s, %d batch(es)", PHASE_TITLES.get(phase, phase), self._phase_total)
        self._name_step()
        self._show()

    def advance(self, steps: int = 1) -> None:
        """``steps`` more steps of the current phase are done."""
        if self._phase not in self._fraction_done:
            return  # other phase names own no share of the bar
        self._phase_steps += steps
        self._step_updates = 0
        self._set_fraction(self._phase_steps)
        self._name_step()

    def within_step(self, fraction: float) -> None:
        """The current step is ``fraction`` done (from the pipeline's inner loops).  The first
        ``FREE_UPDATES`` moves of a step are shown as they come (a short phase still visibly moves); later
        ones at most every ``MIN_INTERVAL_S`` and ``MIN_MOVE`` bar steps apart (a message per DiT block or VAE
        stage would flood the websocket)."""
        if self._phase in self._fraction_done and self._phase_steps < self._phase_total:
            position = self.position
            self._set_fraction(self._phase_steps + min(max(fraction, 0.0), 1.0), show=False)
            if self._step_updates < self.FREE_UPDATES or (
                    time.monotonic() - self._last_shown >= self.MIN_INTERVAL_S
                    and self._position() - position >= self.MIN_MOVE):
                self._step_updates += 1
                self._show()

    def _set_fraction(self, steps: float, show: bool = True) -> None:
        fraction = min(steps / self._phase_total, 1.0) if self._phase_total else 1.0
        self._fraction_done[self._phase] = max(self._fraction_done[self._phase], fraction)
        if show:
            self._show()

    def _name_step(self) -> None:
        """Show the phase and the batch in progress on the node."""
        title = PHASE_TITLES.get(self._phase, self._phase)
        step = min(self._phase_steps + 1, self._phase_total)
        label = f"SeedVR2: {title}, batch {step}/{self._phase_total}" if self._phase_total else f"SeedVR2: {title}"
        if label != self._label and self._send_text is not None:
            self._send_text(label)
        self._label = label

    def finish(self) -> None:
        """The run is complete: fill the bar, including the share of phases the run had no use for (the
        post-processing phase only runs for RGBA inputs)."""
        self._fraction_done = dict.fromkeys(self._fraction_done, 1.0)
        self._show()

    def check_interrupt(self) -> None:
        """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
        if model_management is not None:
            model_management.throw_exception_if_processing_interrupted()

    def _position(self) -> int:
        done = sum(self.PHASE_WEIGHTS[phase] * fraction for phase, fraction in self._fraction_done.items())
        return max(self.position, round(done * self.BAR_STEPS))

    def _show(self) -> None:
        self.position = self._position()
        if self._bar is not None and self.position != self._shown:  # one message per visible change
            self._bar.update_absolute(self.position)
            self._last_shown = time.monotonic()
        self._shown = self.position
