"""engine.cli: the one parser class and exit-code rule that every CLI of engine, export and trainer uses."""

import importlib
import random

import pytest

from engine import cli

# (module, argv before the bad flag): every CLI served by engine.cli.
CLIS = [("engine.run", []), ("engine.bench", ["latency"]), ("engine.bench", ["cache"]), ("engine.profile", []),
        ("engine.calibrate_cache", []), ("engine.flops", []), ("export.__main__", ["onnx"]),
        ("export.__main__", ["check"]), ("trainer.train", []), ("trainer.evaluate", []),
        ("trainer.compose", []), ("trainer.text_cache", [])]


@pytest.mark.parametrize("module,argv", CLIS)
def test_argparse_errors_are_one_line_exit_2_without_usage(module, argv, capsys):
    flag = f"--no-such-flag-{random.randrange(10**6)}"
    main = importlib.import_module(module).main
    assert main(argv + [flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert flag in err[0] or "required" in err[0], err  # argparse names a missing required flag first


def test_every_cli_parser_is_the_one_class():
    from engine import bench, run
    from export.__main__ import _parser
    from trainer import evaluate, train

    for parser in (run.build_parser(), _parser(), train.build_parser(), evaluate.build_parser()):
        assert isinstance(parser, cli.Parser)
    with pytest.raises(cli.UsageError, match="invalid choice"):
        p = cli.Parser(prog="x")
        bench.add_run_args(p)
        p.add_argument("kind", choices=("a", "b"))
        p.parse_args(["c"])


def test_run_main_exit_codes(capsys):
    value = random.randrange(3, 100)
    assert cli.run_main(lambda: value) == value
    assert cli.run_main(lambda: None) == 0

    def bad():
        raise ValueError(f"--steps must be >= 1, got {-value}\nsecond line")

    assert cli.run_main(bad) == 2
    assert capsys.readouterr().err == f"error: --steps must be >= 1, got {-value}; second line\n"
    assert cli.run_main(lambda: open(f"/no/such/file-{value}")) == 2
    assert f"file-{value}" in capsys.readouterr().err

    def interrupted():
        raise KeyboardInterrupt

    assert cli.run_main(interrupted, interrupted="interrupted; nothing was written") == 130
    assert capsys.readouterr().err == "error: interrupted; nothing was written\n"
    assert cli.run_main(bad, speak=False) == 2 and capsys.readouterr().err == ""

    def crash():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cli.run_main(crash)
    assert cli.run_main(crash, crash_code=1) == 1
    assert "RuntimeError: boom" in capsys.readouterr().err


def test_fail_and_parse_or_exit_exit_2_with_one_line(capsys):
    p = cli.Parser(prog="x")
    p.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as e:
        cli.parse_or_exit(p, ["--n", "seven"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seven" in err[0] and err[0].startswith("error: ")
    assert cli.parse_or_exit(p, ["--n", "7"]).n == 7


def test_read_prompts(tmp_path):
    words = [f"prompt {random.randrange(10**6)}" for _ in range(3)]
    path = tmp_path / "p.txt"
    path.write_text(f"  {words[0]}  \n\n{words[1]}\n   \n{words[2]}\n", encoding="utf-8")
    assert cli.read_prompts(str(path)) == [(1, words[0]), (3, words[1]), (5, words[2])]
    with pytest.raises(ValueError, match="prompts file not found"):
        cli.read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts in"):
        cli.read_prompts(str(tmp_path / "blank.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="prompts file .*bin.txt. is UTF-16 text"):
        cli.read_prompts(str(tmp_path / "bin.txt"))


def test_run_ranks_leaves_the_group_with_the_exit_code(monkeypatch, capsys):
    import engine.distributed as dist

    left = []
    monkeypatch.setattr(dist, "finish", lambda info, code: left.append((info, code)))
    info = dist.DistInfo()
    value = random.randrange(3, 100)
    assert cli.run_ranks(lambda joined: joined(info) and value) == value and left == [(info, value)]

    def bad(joined):
        joined(info)
        raise ValueError("bad --device")

    assert cli.run_ranks(bad) == 2 and left[-1] == (info, 2)
    assert capsys.readouterr().err == "error: bad --device\n"
    left.clear()
    assert cli.run_ranks(lambda joined: 0) == 0 and left == []  # never joined: nothing to leave
