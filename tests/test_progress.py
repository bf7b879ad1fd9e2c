"""Progress bars: whole lines in a log file, nothing when disabled; Keras' verbose by where output goes."""

import io

from vggface_gender import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_whole_lines_ending_with_the_final_count():
    log = io.StringIO()
    with progress.Progress(5, "hashing", stream=log) as bar:
        for _ in range(5):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("hashing:") and "0/5" in lines[0]  # the loop's start shows at once
    assert "5/5" in lines[-1]


def test_a_terminal_gets_a_bar_redrawn_in_place():
    tty = Terminal()
    with progress.Progress(3, "extracting", stream=tty) as bar:
        bar.update(3)
    assert "\r" in tty.getvalue() and "3/3" in tty.getvalue()


def test_disabled_bars_write_nothing():
    log = io.StringIO()
    with progress.Progress(3, "verifying", stream=log, enabled=False) as bar:
        bar.update(3)
    assert log.getvalue() == ""


def test_keras_verbose_is_live_only_on_a_terminal_outside_notebooks():
    assert not progress.in_notebook()
    assert progress.keras_verbose(io.StringIO()) == 2
    assert progress.keras_verbose(Terminal()) == 1
