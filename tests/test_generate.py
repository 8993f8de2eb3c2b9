"""`longsana generate`'s file readers and size check are library code: they raise ValueError naming the file and
line, and the command (tests/test_stream.py, tests/test_base.py) turns that into one line of error."""

from __future__ import annotations

import click
import pytest

from longsana.config import get_config
from longsana.generate import base_clip_settings, check_text, past_the_end, read_prompt_file, read_timeline


@pytest.mark.parametrize("text, message", [
    ("0 a fox\nsoon an owl\n", r"tl\.txt:2: expected '<start seconds> <prompt>', got 'soon an owl'"),
    ("1 a fox\n", r"tl\.txt:1: the first segment must start at 0, not 1"),
    ("0 a fox\n2 an owl\n2 a cat\n", r"tl\.txt:3: start 2s is not after the previous 2s"),
    ("# only a comment\n\n", r"tl\.txt: no segments"),
])
def test_read_timeline_raises_value_error(tmp_path, text, message):
    path = tmp_path / "tl.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        read_timeline(path)
    assert not isinstance(e.value, click.ClickException)


def test_read_timeline(tmp_path):
    path = tmp_path / "tl.txt"
    path.write_text("# story\n0 a fox\n\n2.5 an owl\n")
    assert read_timeline(path) == [(0.0, "a fox"), (2.5, "an owl")]


def test_read_prompt_file_without_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=r"p\.txt: no prompts"):
        read_prompt_file(path)


def test_base_clip_size_must_be_even():
    """The base model generates at its nearest 480p entry and resizes back to any size, but H.264 needs even sides."""
    with pytest.raises(ValueError, match="H.264 needs an even height and width, got 481x832"):
        base_clip_settings(get_config("sana-video-2b-480p"), None, 481, 832)


@pytest.mark.parametrize("read", [read_timeline, read_prompt_file])
def test_text_files_that_are_not_utf8(tmp_path, read):
    path = tmp_path / "in.txt"
    path.write_bytes(b"0 a fox\n" + "2 a caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"in\.txt:2: not UTF-8 text \(byte 0xe9 at offset 15\)") as e:
        read(path)
    assert type(e.value) is ValueError  # not UnicodeDecodeError, whose message names no file


def test_check_text():
    assert check_text("a fox \u00e9", "--prompt") == "a fox \u00e9"
    with pytest.raises(ValueError, match=r"--prompt: not valid UTF-8 text \(byte 0xff at character 2\)"):
        check_text("a \udcff", "--prompt")
    with pytest.raises(ValueError, match=r"--prompt: not valid UTF-8 text \(a lone surrogate U\+D800 at character 0\)"):
        check_text("\ud800", "--prompt")


def test_past_the_end():
    timeline = [(0.0, "a"), (4.0, "b"), (5.0, "c"), (9.0, "d")]
    assert past_the_end(timeline, 5.0) == [(5.0, "c"), (9.0, "d")]
    assert past_the_end(timeline, 10.0) == []
