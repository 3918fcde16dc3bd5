"""Text inputs as spreadsheets and editors save them (engine.text_files): BOM, CRLF, quoted CSV fields,
blank lines; what cannot be read is one line naming the file and the line."""

import json

import pytest

from engine.cli import read_prompts
from engine.configs import load_config
from engine.text_files import read_csv, read_json, read_lines, read_text

BOM = b"\xef\xbb\xbf"


def test_bom_and_crlf_are_what_an_editor_writes(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(BOM + b"a red circle\r\n\r\n  a blue square  \r\nlast\r\n\r\n\r\n")
    assert read_lines(str(path)) == [(1, "a red circle"), (3, "a blue square"), (4, "last")]
    assert read_prompts(str(path))[0] == (1, "a red circle")  # no "\ufeff" glued to the first prompt


def test_old_mac_line_ends(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"one\rtwo\r")
    assert read_lines(str(path)) == [(1, "one"), (2, "two")]


def test_not_utf8_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("fine\nalso fine\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError) as e:
        read_lines(str(path), "prompts file")
    assert str(e.value).startswith(f"prompts file {str(path)!r}, line 3: not UTF-8 text (byte 0xe9)")
    assert "\n" not in str(e.value)


def test_utf16_and_binary_files(tmp_path):
    path = tmp_path / "u16.txt"
    path.write_bytes("a prompt\n".encode("utf-16"))
    with pytest.raises(ValueError, match="is UTF-16 text: save it as UTF-8"):
        read_lines(str(path))
    path.write_bytes(b"ok\nbinary\x00junk\n")
    with pytest.raises(ValueError, match="u16.txt', line 2: a NUL byte"):
        read_lines(str(path))


def test_missing_and_folder(tmp_path):
    with pytest.raises(ValueError, match="prompts file not found: .*nope.txt"):
        read_text(str(tmp_path / "nope.txt"), "prompts file")
    with pytest.raises(ValueError, match="is a folder"):
        read_text(str(tmp_path), "prompts file")


def test_csv_quoted_fields_bom_crlf_and_blank_rows(tmp_path):
    path = tmp_path / "c.csv"
    text = ('path,caption\r\n"a.mp4","a dog, running"\r\nb.mp4,"she said ""hi"""\r\n'
            '"c.mp4","two\r\nlines"\r\n,,\r\n\r\nd.mp4, spaced \r\n\r\n\r\n')
    path.write_bytes(BOM + text.encode())
    assert read_csv(str(path)) == [(1, ["path", "caption"]), (2, ["a.mp4", "a dog, running"]),
                                   (3, ["b.mp4", 'she said "hi"']), (4, ["c.mp4", "two\r\nlines"]),
                                   (8, ["d.mp4", "spaced"])]


def test_csv_malformed_row_names_its_line(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('a.mp4,ok\nb.mp4,"never closed\nc.mp4,x\n')
    with pytest.raises(ValueError, match=r"c.csv', line 2: "):
        read_csv(str(path), "captions file")
    path.write_bytes(b"a.mp4,ok\nb.mp4,bad\x00byte\n")
    with pytest.raises(ValueError, match=r"c.csv', line 2: "):
        read_csv(str(path), "captions file")


def test_json_with_bom_and_syntax_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(BOM + json.dumps({"a": 1}).encode())
    assert read_json(str(path)) == {"a": 1}
    path.write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(ValueError, match=r"config '.*c.json', line 4, column 1: not valid JSON"):
        read_json(str(path), "config")


def test_config_saved_with_a_bom_loads(tmp_path):
    src = load_config("default")
    path = tmp_path / "mine.json"
    path.write_bytes(BOM + json.dumps(src.to_dict(), indent=2).replace("\n", "\r\n").encode())
    assert load_config(str(path)).to_dict() == src.to_dict()
    path.write_text(json.dumps(src.to_dict(), indent=2)[:-3])
    with pytest.raises(ValueError, match=r"config '.*mine.json', line \d+, column \d+: not valid JSON"):
        load_config(str(path))
