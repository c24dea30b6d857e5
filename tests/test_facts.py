"""Each fact the code relies on is stated once: the method names, the norms, the pixel box, the
default step sizes, the evaluation's budgets, the dataset facts, the positive-number check, the
device picker, the config hash, the metrics reader; no library function looks like a test, and none
unpickles or evaluates code."""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
from pathlib import Path

import pytest
import torch

from fosctrain import config, methods
from fosctrain.attacks import PGD, PGDL2
from fosctrain.device import select_device
from fosctrain.errors import UserError, check_positive
from fosctrain.fosc import fosc
from fosctrain.threat import NORMS, eval_step_size, train_step_size

SRC = Path(__file__).resolve().parents[1] / "src" / "fosctrain"


def test_the_method_names_are_the_registrys():
    names = tuple(methods.METHODS)  # in registration order: --help and errors list them so
    assert names == config.METHODS
    assert config.FIELDS["method"].metadata["help"] == f"training method: {', '.join(names)}"


def test_default_step_sizes_come_from_one_place():
    c = config.Config(eps=0.3, steps=10, eval_steps=20)
    assert c.step_size == train_step_size(0.3) == pytest.approx(0.075)
    assert c.eval_step_size == eval_step_size(0.3, 20) == pytest.approx(0.0375)
    assert PGD(eps=0.3).step_size == PGDL2(eps=0.3).step_size == train_step_size(0.3)
    assert config.Config(alpha=0.01).step_size == train_step_size(0.3, 0.01) == 0.01


def test_every_norm_is_accepted_everywhere_and_nothing_else():
    x = torch.rand(2, 1, 3, 3)
    for norm in NORMS:
        config.validate(config.Config(norm=norm, eps=0.3))
        assert fosc(x, x, torch.ones_like(x), 0.1, norm).shape == (2,)
    with pytest.raises(UserError, match="unknown norm"):
        fosc(x, x, torch.ones_like(x), 0.1, "l1")


@pytest.mark.parametrize(
    ("value", "options", "ok"),
    [
        (1, {"integer": True}, True),
        (0, {"integer": True}, False),
        (0, {"integer": True, "zero_ok": True}, True),
        (2.5, {"integer": True}, False),
        (True, {"integer": True}, False),
        (1e-9, {}, True),
        (0.0, {}, False),
        (float("nan"), {}, False),
        (float("inf"), {}, False),
        ("3", {}, False),
    ],
)
def test_check_positive(value, options, ok):
    if ok:
        assert check_positive("x", value, **options) == value
    else:
        with pytest.raises(UserError, match=r"^x must be"):
            check_positive("x", value, **options)


def test_one_device_picker():
    assert select_device("auto") == select_device(None) == select_device()
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device"):
        select_device("warp-drive")


def test_config_hash_is_the_one_run_directories_recorded():
    old = dict(test_attack="none", test_targets=9, val_attack="pgd")  # before issue 18
    c = config.Config(eps=0.2, device="cpu", threads=1, **old)
    d = c.identity()
    assert not d.keys() & (config.RUNTIME_FIELDS | config.NEUTRAL.keys())
    assert set(d) | config.RUNTIME_FIELDS | config.NEUTRAL.keys() == set(c.to_dict())
    recorded = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert c.hash() == config.config_hash(d) == recorded
    assert config.Config(eps=0.2, device="cuda", **old).hash() == c.hash()


def test_one_metrics_reader():
    from fosctrain import logs, plots

    assert plots.read_metrics is logs.read_metrics


def test_no_library_function_is_named_like_a_test():
    found = [
        f"{path.relative_to(SRC)}:{node.lineno} {node.name}"
        for path in SRC.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    ]
    assert found == []


def test_a_run_recorded_before_the_strong_test_attack_keeps_its_hash():
    before = config.Config(eps=0.2, test_attack="none", test_targets=9, val_attack="pgd")
    added = ("val_attack", "test_attack", "test_targets")
    recorded = {k: v for k, v in before.to_dict().items() if k not in added}  # its config.json
    assert config.Config.stored(recorded).hash() == before.hash()
    assert config.Config(**recorded).hash() != before.hash()  # today's defaults differ


HOMES = {
    "PGD_STEPS": "evaluate.py",
    "CW_STEPS": "evaluate.py",
    "CHECK_N": "masking.py",
    "DATASETS": "data.py",
    "DATASET_NAMES": "data.py",
    "ATTACKS": "attacks/registry.py",
    "FGSM_RS_ALPHA": "attacks/fgsm.py",
}


def test_each_of_these_facts_is_assigned_in_its_home_module_only():
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            else:
                continue
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name) and name.id in HOMES:
                        found.setdefault(name.id, []).append(str(path.relative_to(SRC)))
    assert found == {name: [home] for name, home in HOMES.items()}


def test_the_evaluation_budgets_come_from_evaluate():
    from fosctrain import estimate, evaluate, masking, reproduce
    from fosctrain.commands import eval as eval_command

    assert (evaluate.PGD_STEPS, evaluate.CW_STEPS, masking.CHECK_N) == (20, 30, 256)
    defaults = inspect.signature(evaluate.evaluate).parameters
    assert defaults["pgd_steps"].default == evaluate.PGD_STEPS
    assert defaults["cw_steps"].default == evaluate.CW_STEPS
    assert defaults["check_n"].default == masking.CHECK_N
    parser = argparse.ArgumentParser()
    eval_command.add_arguments(parser)
    args = parser.parse_args(["RUN"])
    assert (args.pgd_steps, args.cw_steps) == (evaluate.PGD_STEPS, evaluate.CW_STEPS)
    assert (reproduce.PGD_STEPS, reproduce.CW_STEPS) == (evaluate.PGD_STEPS, evaluate.CW_STEPS)
    assert (estimate.EVAL_GRADS, estimate.CHECK_GRADS) == (54, 110)  # the estimates did not move


def _imported_modules(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_the_library_never_imports_its_cli():
    """Imports go one way: commands/ and cli.py sit on top of the library, never under it."""
    offenders = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel == "cli.py" or rel.startswith("commands/") or rel == "__main__.py":
            continue
        bad = {m for m in _imported_modules(ast.parse(path.read_text())) if "commands" in m}
        if bad:
            offenders[rel] = sorted(bad)
    assert not offenders, offenders


FORBIDDEN = {"eval", "exec", "compile", "__import__"}


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in FORBIDDEN:
            found.append(f"{f.id}()")
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            name = f"{f.value.id}.{f.attr}"
            if name in ("pickle.load", "pickle.loads", "marshal.load", "marshal.loads"):
                found.append(name)
            if name in ("yaml.load", "yaml.unsafe_load", "dill.load", "dill.loads"):
                found.append(name)
            if name == "torch.load":
                safe = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    found.append("torch.load without weights_only=True")
        if f"{ast.unparse(f)}".endswith(("Unpickler", "unsafe_load")):
            found.append(ast.unparse(f))
    return found


def test_package_never_unpickles_or_evaluates_code():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    bad = {}
    for path in files:
        calls = _unsafe_calls(ast.parse(path.read_text(), str(path)))
        if calls:
            bad[str(path.relative_to(SRC))] = calls
    assert bad == {}
    # The scanner itself does catch what it looks for.
    probe = "pickle.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=False)\neval('1')\nexec(s)"
    assert len(_unsafe_calls(ast.parse(probe))) == 5
    assert _unsafe_calls(ast.parse("model.eval()\ntorch.load(p, weights_only=True)")) == []
