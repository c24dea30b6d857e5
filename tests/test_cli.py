"""The command line's entry point (fosctrain.cli): version and help of every verb, `python -m
fosctrain`, and the command line fed random junk (hypothesis) or known bad arguments: exit 0,
or one `fosc: error:` line, never a traceback. The junk never starts real work: `train` always
gets --print-config, the other verbs a checkpoint path that does not exist."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fosctrain import __version__, cli
from fosctrain.cli import main

# --------------------------------------------------------------------------- version and help


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out
    assert main([]) == 0
    out = capsys.readouterr().out
    for verb in ("train", "attack", "eval", "measure", "plot"):
        assert verb in out


def test_python_dash_m_works():
    out = subprocess.run(
        [sys.executable, "-m", "fosctrain", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and __version__ in out.stdout


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_every_verb_has_working_help(verb, capsys):
    """argparse %-formats help texts: a bare '%' in one (e.g. '12.5%') crashes --help."""
    with pytest.raises(SystemExit) as e:
        cli.main([verb, "--help"])
    assert e.value.code == 0
    assert "usage: fosc " + verb in capsys.readouterr().out


# --------------------------------------------------------------------------- junk


def test_every_verb_has_its_command_module():
    """The junk tests below walk cli.VERBS: a verb without its module must fail here, not be
    skipped there."""
    missing = [v for v in cli.VERBS if importlib.util.find_spec(f"fosctrain.commands.{v}") is None]
    assert not missing, missing


def _flags(verb: str) -> list[str]:
    parser = cli.build_parser([verb])
    sub = parser._subparsers._group_actions[0].choices[verb]
    return sorted({s for a in sub._actions for s in a.option_strings if s not in ("-h", "--help")})


# Text without NUL (no shell can pass one), lone surrogates, or line breaks (the messages
# echo arguments verbatim: test_line_breaks_in_arguments_do_not_break_the_one_line_error).
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00" + LINE_BREAKS),
    max_size=12,
)


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**12), 10**12).map(str),
    st.sampled_from(["nan", "inf", "-inf", "-0", "1e400", "-1e-400", "0x10", "1_0", "auto"]),
)


def tokens(flags: list[str]) -> st.SearchStrategy[list[str]]:
    flag = st.sampled_from(flags)
    unknown = st.sampled_from(["--bogus", "-x", "--eps=", "--", "-", "--lr=nan", "---"])
    value = st.one_of(numbers, text, st.sampled_from(["none", "None", "{}", "[1]", '{"a": 1}']))
    pair = st.tuples(flag, value).map(list)
    single = st.one_of(flag, unknown, value).map(lambda t: [t])
    return st.lists(st.one_of(pair, pair, single), max_size=6).map(
        lambda parts: [t for part in parts for t in part]
    )


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's --help and --version exit 0 by design
        rc = e.code
        assert rc == 0, argv
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_clean(rc, out: str, err: str, argv: list[str]) -> None:
    """Exit 0 quietly, or one `fosc: error:` line with status 2 (bad input) or 1 (an
    OSError such as ENAMETOOLONG, which cli.main reports with status 1 by design)."""
    assert "Traceback" not in err and "Traceback" not in out, argv
    if rc == 0:
        assert err == "", (argv, err)
        return
    assert rc in (1, 2), (argv, rc, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fosc: error: "), (argv, err)
    assert len(lines[0]) < 2000


JUNK = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def in_empty_dir(tmp_path, monkeypatch):
    """Relative paths in the junk (".", "") must not find anything of this repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@JUNK
@given(data=st.data())
def test_train_junk_arguments_never_traceback(in_empty_dir, capsys, data):
    junk = data.draw(tokens(_flags("train")), label="junk")
    argv = ["train", *junk, "--print-config"]
    rc, out, err = _run(capsys, argv)
    _assert_clean(rc, out, err, argv)
    if rc == 0 and out.lstrip().startswith("{"):
        config = json.loads(out)  # --print-config: the resolved config, valid values only
        for key in ("eps", "lr", "batch_size", "epochs", "steps"):
            assert math.isfinite(config[key]) and config[key] > 0, (argv, key)
        assert config["eps"] <= 1 or config["norm"] == "l2"


@pytest.mark.parametrize("verb", [v for v in cli.VERBS if v != "train"])
def test_other_verbs_on_junk_never_traceback(in_empty_dir, capsys, verb):
    flags = _flags(verb)

    @JUNK
    @given(junk=tokens(flags))
    def check(junk):
        argv = [verb, str(in_empty_dir / "no-such-run"), *junk]
        rc, out, err = _run(capsys, argv)
        _assert_clean(rc, out, err, argv)
        assert rc != 0 or "--help" in junk or "-h" in junk or "--version" in junk, argv

    check()


@JUNK
@given(verb=text, junk=st.lists(st.one_of(text, numbers), max_size=4))
def test_random_verbs_never_traceback(in_empty_dir, capsys, verb, junk):
    assume(verb not in cli.VERBS)
    argv = [verb, *junk]
    rc, out, err = _run(capsys, argv)
    _assert_clean(rc, out, err, argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--eps", "nan", "--print-config"],
        ["train", "--eps", "inf", "--print-config"],
        ["train", "--eps", "-0.1", "--print-config"],
        ["train", "--lr", "1e400", "--print-config"],
        ["train", "--batch-size", "1.5", "--print-config"],
        ["train", "--threads", "0", "--print-config"],
        ["train", "--model-kwargs", "[1]", "--print-config"],
        ["train", "--c-max", "-1", "--print-config"],
        ["train", "--frobnicate", "--print-config"],
        ["train", "--resume", "no-such-run", "--print-config"],
        ["train", "--config", "no-such.toml", "--print-config"],
        ["train", "--config", ".", "--print-config"],
        ["train", "--checkpoint-every", "-1", "--print-config"],
        ["train", "--resume", "x" * 300, "--print-config"],
        ["attack", "no-such-run", "--eps", "nan"],
        ["eval", "no-such-run", "--device", "tpu:nine"],
        ["eval", "no-such-run", "--n", "0"],
        ["eval", "x" * 300],
    ],
    ids=lambda a: " ".join(a)[:40],
)
def test_known_bad_arguments_are_one_line(in_empty_dir, capsys, argv):
    rc, out, err = _run(capsys, argv)
    assert rc == (1 if "x" * 300 in argv else 2), (rc, err)
    _assert_clean(rc, out, err, argv)


@pytest.mark.parametrize("brk", ["\n", "\r", "\x0c"], ids=["LF", "CR", "FF"])
def test_line_breaks_in_arguments_do_not_break_the_one_line_error(in_empty_dir, capsys, brk):
    argv = ["train", f"--frob{brk}nicate", "--print-config"]
    rc, out, err = _run(capsys, argv)
    _assert_clean(rc, out, err, argv)


def test_top_level_help_and_version(capsys):
    for argv in ([], ["--help"], ["--version"]):
        rc, out, err = _run(capsys, argv)
        assert rc == 0 and "Traceback" not in err and out
