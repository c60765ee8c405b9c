"""The command line's console: each log line once, lines above the progress bar, a bar that moves inside
phases and stays on screen, one readable line per phase without a terminal."""
from __future__ import annotations

import io
import logging
import re
import time

import pytest

from src.pipeline.console import PHASE_WEIGHTS, ConsoleHandler, ConsoleProgress, console_logging


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(text: str) -> list[str]:
    """What a terminal shows after ``text``: carriage returns overwrite, ESC[nA moves up, ESC[K clears."""
    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[\d*[A-Za-z]|.", text, flags=re.S):
        if token.startswith("\x1b"):
            count = int(token[2:-1] or 1)
            if token[-1] == "A":
                row = max(row - count, 0)
            elif token[-1] == "K":
                lines[row] = lines[row][:col]
        elif token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines.extend([""] * (row + 1 - len(lines)))
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + 1:]
            col += 1
    return [line.rstrip() for line in lines if line.strip()]


def test_a_library_that_has_its_own_handler_is_printed_once(capfd):
    import huggingface_hub.utils.logging  # noqa: F401 - attaches its console handler at import

    hub_logger = logging.getLogger("huggingface_hub")
    before = list(hub_logger.handlers)
    with console_logging():
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        logging.getLogger("seedvr2").info("loading the DiT")
        logging.getLogger("httpx").info("HTTP Request: HEAD https://huggingface.co/...")
    err = capfd.readouterr().err
    assert err.count("Retrying in 1s [Retry 1/5].") == 1
    assert "warning: Retrying in 1s" in err and "loading the DiT" in err
    assert "HTTP Request" not in err, "other libraries' INFO chatter stays off"
    assert hub_logger.handlers == before, "the logging setup is restored afterwards"


def test_log_lines_go_above_the_bar_not_into_it():
    terminal = FakeTerminal()
    handler = ConsoleHandler(terminal)
    progress = ConsoleProgress("clip.mp4", 12, handler, refresh_seconds=60)
    assert progress.bars
    logger = logging.getLogger("seedvr2.test_console")
    logger.addHandler(handler)
    try:
        progress.begin_chunk(12)
        progress.start_phase("encode", 3)
        progress.advance()
        logger.warning("a line logged while the bar is drawn")
        progress.advance(2)
        progress.start_phase("upscale", 3)
    finally:
        logger.removeHandler(handler)
        progress.close()
    shown = screen(terminal.getvalue())
    assert shown[0] == "warning: a line logged while the bar is drawn"
    encoded = 12 * PHASE_WEIGHTS["encode"] / sum(PHASE_WEIGHTS[p] for p in ("encode", "upscale", "decode"))
    assert len(shown) == 2 and shown[1].startswith(f"clip.mp4: {100 * encoded / 12:3.0f}%|")
    assert f"| {encoded:.1f}/12 frames [" in shown[1] and shown[1].endswith(", upscale 0/3]")


def test_the_bar_stays_on_screen_at_the_end_and_where_a_failure_left_it():
    terminal = FakeTerminal()
    progress = ConsoleProgress("photo.png", 1, ConsoleHandler(terminal), refresh_seconds=60)
    progress.begin_chunk(1)
    progress.start_phase("encode", 1)
    progress.advance()
    progress.close()  # a failure: no finish()
    encoded = PHASE_WEIGHTS["encode"] / sum(PHASE_WEIGHTS[p] for p in ("encode", "upscale", "decode"))
    assert screen(terminal.getvalue())[-1].startswith(f"photo.png: {100 * encoded:3.0f}%|")

    terminal = FakeTerminal()
    progress = ConsoleProgress("photo.png", 1, ConsoleHandler(terminal), refresh_seconds=60)
    progress.begin_chunk(1)
    for phase in ("encode", "upscale", "decode"):
        progress.start_phase(phase, 1)
        progress.advance()
    progress.finish()
    last = screen(terminal.getvalue())[-1]
    assert last.startswith("photo.png: 100%|") and "1.0/1 frames" in last


def test_an_image_moves_through_the_phases_instead_of_waiting_at_zero():
    progress = ConsoleProgress("photo.png", 1, ConsoleHandler(io.StringIO()), bars=False)
    progress.begin_chunk(1)
    seen = []
    for phase in ("encode", "upscale", "decode"):
        progress.start_phase(phase, 2)
        seen.append(progress.frames_done())
        progress.advance()
        seen.append(progress.frames_done())
        progress.advance()
    seen.append(progress.frames_done())
    total = PHASE_WEIGHTS["encode"] + PHASE_WEIGHTS["upscale"] + PHASE_WEIGHTS["decode"]
    encode, upscale = PHASE_WEIGHTS["encode"] / total, PHASE_WEIGHTS["upscale"] / total
    expected = [0, encode / 2, encode, encode + upscale / 2, encode + upscale, (1 + encode + upscale) / 2, 1]
    assert seen == pytest.approx(expected)


def test_chunks_add_up_and_a_short_count_is_corrected():
    progress = ConsoleProgress("clip.mp4", 20, ConsoleHandler(io.StringIO()), bars=False)
    progress.begin_chunk(8)
    for phase in ("encode", "upscale", "decode"):
        progress.start_phase(phase, 1)
        progress.advance()
    assert progress.frames_done() == pytest.approx(8)
    progress.begin_chunk(4)
    assert progress.frames_done() == 8
    progress.finish()  # the input held 12 frames, not the 20 its header said
    assert progress.frames_done() == 12 and progress.total == 12


def test_without_a_terminal_each_phase_is_one_log_line_with_the_time_left(caplog):
    stream = io.StringIO()
    handler = ConsoleHandler(stream)
    logger = logging.getLogger("seedvr2")
    caplog.set_level(logging.INFO, logger="seedvr2")
    logger.addHandler(handler)
    try:
        progress = ConsoleProgress("clip.mp4", 10, handler)
        assert not progress.bars
        progress.begin_chunk(5)
        for phase in ("encode", "upscale", "decode"):
            progress.start_phase(phase, 2)
            progress.advance(2)
        progress.begin_chunk(5)
        progress.start_phase("encode", 2)
        progress.finish()
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("clip.mp4: encode (2 steps); 0 % of 10 frame(s) done, 00:00 elapsed")
    encoded = 100 * PHASE_WEIGHTS["encode"] / sum(PHASE_WEIGHTS[p] for p in ("encode", "upscale", "decode"))
    assert lines[1].startswith(f"clip.mp4: upscale (2 steps); {encoded / 2:.0f} % of 10 frame(s) done")
    assert len(lines) == 4 and lines[3].startswith("clip.mp4: encode (2 steps); 50 % of 10 frame(s) done")
    assert re.search(r"about \d\d:\d\d left$", lines[3])
    assert "\r" not in stream.getvalue()


def test_the_clock_moves_while_a_long_step_runs():
    terminal = FakeTerminal()
    progress = ConsoleProgress("photo.png", 1, ConsoleHandler(terminal), refresh_seconds=0.02)
    progress.begin_chunk(1)
    progress.start_phase("decode", 1)
    drawn = len(terminal.getvalue())
    time.sleep(0.3)
    redrawn = len(terminal.getvalue())
    progress.close()
    assert redrawn > drawn
