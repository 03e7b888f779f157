"""What a run shows on the terminal: log lines print above a live progress bar, not into it."""
from __future__ import annotations

import io
import logging

import pytest
from tqdm import tqdm

from ds_hydra.common.terminal import log_lines_beside_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def console(monkeypatch):
    """A terminal stream standing in for stderr, with a console handler on it as Hydra sets one up.
    (Each test puts it in sys.stderr: pytest's capture sets sys.stderr again between setup and call.)"""
    stream = Terminal()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("test_terminal")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.DEBUG)
    yield stream, logger, handler
    logger.handlers, logger.propagate = [], True


def draw_and_log(stream, logger, redirect: bool, monkeypatch) -> str:
    monkeypatch.setattr("sys.stderr", stream)
    with log_lines_beside_bar(redirect, logger=logger):
        bar = tqdm(total=10, file=stream, ncols=60, mininterval=0)
        bar.update(3)
        logger.info("step 3: val loss 4.0517")
        logger.debug("not shown: below the console's level")
        bar.update(2)
        bar.close()
    return stream.getvalue()


def test_a_log_line_prints_on_its_own_line_above_the_bar(console, monkeypatch):
    stream, logger, handler = console
    out = draw_and_log(stream, logger, True, monkeypatch)
    before, after = out.split("[INFO] step 3: val loss 4.0517\n")
    assert before.endswith("\r")  # the bar was cleared before the line was written
    assert after.lstrip("\r").startswith(" 30%") or "30%" in after.split("\r")[1]  # and drawn again below it
    assert "not shown" not in out  # the console handler's level is kept
    # restored after the block (pytest may add its own capturing handlers beside it)
    assert handler in logger.handlers and not any(type(h).__name__ == "_BesideBar" for h in logger.handlers)


def test_without_the_redirect_the_line_runs_into_the_bar(console, monkeypatch):
    """What the redirect fixes: the line starts right after the bar's text, on the bar's row."""
    stream, logger, _ = console
    out = draw_and_log(stream, logger, False, monkeypatch)
    before = out.split("[INFO] step 3")[0]
    assert not before.endswith(("\r", "\n")) and "30%" in before.rsplit("\r", 1)[-1]


def test_the_run_log_file_keeps_its_own_handler(tmp_path, console, monkeypatch):
    stream, logger, handler = console
    log_file = logging.FileHandler(tmp_path / "run.log")
    logger.addHandler(log_file)
    monkeypatch.setattr("sys.stderr", stream)
    with log_lines_beside_bar(True, logger=logger):
        assert log_file in logger.handlers and handler not in logger.handlers
        logger.info("saved")
    log_file.close()
    assert (tmp_path / "run.log").read_text() == "saved\n"
