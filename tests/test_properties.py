"""Property-based tests (hypothesis): FOSC on random 4-D shapes and budgets, the attack
engine's projection, and the command line fed random junk.

The FOSC properties here draw whole N x C x H x W batches and put the iterate inside the set
with `engine.project`, as PGD does; tests/test_fosc.py checks the same formulas against numpy
on flat vectors. The CLI fuzzing never starts real work: `train` always gets --print-config,
the other verbs a checkpoint path that does not exist.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fosctrain import cli
from fosctrain.attacks.engine import project
from fosctrain.fosc import fosc

# --------------------------------------------------------------------------- FOSC

shapes = st.tuples(
    st.integers(1, 4), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)
)  # N, C, H, W
budgets = st.floats(1e-3, 1.0, allow_nan=False)
seeds = st.integers(0, 2**31 - 1)
FAST = settings(max_examples=40, deadline=None)


def _case(shape, eps, seed, norm="linf", dtype=torch.float64):
    """x0 in [0,1], x = a projected random point of the threat set, g with some exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=gen, dtype=dtype)
    # Some pixels sit on the box faces, where clipping matters.
    x0 = torch.where(torch.rand(shape, generator=gen, dtype=dtype) < 0.2, x0.round(), x0)
    step = (torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) * 3 * eps
    x = project(x0 + step, x0, eps, norm, (0.0, 1.0))
    g = torch.randn(shape, generator=gen, dtype=dtype)
    g = torch.where(torch.rand(shape, generator=gen, dtype=dtype) < 0.15, torch.zeros_like(g), g)
    return x, x0, g


def _tol(g: torch.Tensor, eps: float) -> torch.Tensor:
    """Rounding allowance: a few ulps of the largest term eps * ||g||_1."""
    scale = 1 + eps * g.flatten(1).abs().sum(1)
    return scale * 8 * torch.finfo(g.dtype).eps


@FAST
@given(shape=shapes, eps=budgets, seed=seeds, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fosc_nonnegative_inside_the_set_and_box_below_paper(shape, eps, seed, dtype):
    x, x0, g = _case(shape, eps, seed, dtype=dtype)
    paper = fosc(x, x0, g, eps, "linf")
    box = fosc(x, x0, g, eps, "linf", (0.0, 1.0))
    tol = _tol(g, eps)
    assert paper.shape == box.shape == (shape[0],)
    assert (paper >= -tol).all()
    assert (box >= -tol).all()
    assert (box <= paper + tol).all()


@FAST
@given(shape=shapes, eps=budgets, seed=seeds)
def test_fosc_zero_at_the_vertex_maximiser(shape, eps, seed):
    """For a linear loss <g, x> the maximiser over the set is a vertex: FOSC vanishes there."""
    _, x0, g = _case(shape, eps, seed, dtype=torch.float32)
    hi, lo = (x0 + eps).clamp(max=1), (x0 - eps).clamp(min=0)
    vertex = torch.where(g > 0, hi, lo)
    box = fosc(vertex, x0, g, eps, "linf", (0.0, 1.0))
    assert torch.equal(box, torch.zeros_like(box))  # every term is exactly 0 * g_i
    corner = x0 + eps * g.sign()  # the ball's vertex (outside the pixel box: paper form only)
    paper = fosc(corner, x0, g, eps, "linf")
    assert (paper.abs() <= _tol(g, eps) * 4).all()
    # And it is the maximum: any other point of the set has FOSC >= the vertex's (= 0) and
    # a linear objective no larger than the vertex's.
    gen = torch.Generator().manual_seed(seed + 1)
    step = (torch.rand(shape, generator=gen) * 2 - 1) * 3 * eps
    x = project(x0 + step, x0, eps, "linf", (0.0, 1.0))
    assert ((x * g).flatten(1).sum(1) <= (vertex * g).flatten(1).sum(1) + _tol(g, eps)).all()


@FAST
@given(shape=shapes, eps=budgets, seed=seeds)
def test_fosc_l2_form(shape, eps, seed):
    x, x0, g = _case(shape, eps, seed, norm="l2")
    c = fosc(x, x0, g, eps, "l2")
    gn = g.flatten(1).norm(dim=1)
    assert (c >= -1e-12 * (1 + eps * gn)).all()
    # Zero at the L2 maximiser x0 + eps g / ||g||; equal to the closed form eps ||g|| - <d, g>.
    on_sphere = x0 + eps * g / gn.clamp_min(1e-300).view(-1, 1, 1, 1)
    assert (fosc(on_sphere, x0, g, eps, "l2").abs() <= 1e-12 * (1 + eps * gn)).all()
    expected = eps * gn - ((x - x0) * g).flatten(1).sum(1)
    assert torch.allclose(c, expected, rtol=0, atol=1e-12)


@FAST
@given(shape=shapes, eps=budgets, seed=seeds, k=st.floats(1e-3, 1e3))
def test_fosc_is_positively_homogeneous_in_the_gradient_and_per_sample(shape, eps, seed, k):
    x, x0, g = _case(shape, eps, seed)
    for bounds in (None, (0.0, 1.0)):
        c = fosc(x, x0, g, eps, "linf", bounds)
        scaled = fosc(x, x0, k * g, eps, "linf", bounds)
        assert ((scaled - k * c).abs() <= k * _tol(g, eps)).all()  # up to cancellation
        perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(seed))
        assert torch.equal(fosc(x[perm], x0[perm], g[perm], eps, "linf", bounds), c[perm])


# --------------------------------------------------------------------------- projection


@FAST
@given(
    shape=shapes,
    eps=budgets,
    seed=seeds,
    spread=st.floats(0.0, 10.0),
    norm=st.sampled_from(["linf", "l2"]),
)
def test_project_keeps_points_in_the_set_and_is_idempotent(shape, eps, seed, spread, norm):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=gen)
    x = x0 + (torch.rand(shape, generator=gen) * 2 - 1) * spread  # anywhere, also far out
    p = project(x, x0, eps, norm, (0.0, 1.0))
    assert p.shape == x.shape and p.dtype == x.dtype
    assert p.min() >= 0 and p.max() <= 1
    d = (p - x0).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all()
    again = project(p, x0, eps, norm, (0.0, 1.0))
    assert torch.allclose(again, p, rtol=0, atol=1e-6)
    if norm == "linf":
        assert torch.equal(again, p)
    # A point already inside the set is (up to rounding) left where it is.
    inside = project(x0 + (p - x0) * 0.5, x0, eps, norm, (0.0, 1.0))
    assert torch.allclose(inside, x0 + (p - x0) * 0.5, rtol=0, atol=1e-6)


@FAST
@given(shape=shapes, eps=budgets, seed=seeds)
def test_project_linf_is_the_nearest_point_of_the_set(shape, eps, seed):
    """Per coordinate, the L-inf ball intersected with the box is an interval: the projection
    is the clip onto [max(x0 - eps, 0), min(x0 + eps, 1)]."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=gen, dtype=torch.float64)
    x = x0 + torch.randn(shape, generator=gen, dtype=torch.float64)
    lo, hi = (x0 - eps).clamp(min=0), (x0 + eps).clamp(max=1)
    p = project(x, x0, eps, "linf", (0.0, 1.0))
    assert torch.allclose(p, torch.minimum(torch.maximum(x, lo), hi), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the CLI on junk


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
