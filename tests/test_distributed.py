"""Data-parallel training (fosctrain.distributed): 2-process runs on CPU (gloo, localhost)
against 1-process runs, resume across world sizes, launch errors, and AMP / torch.compile.

Two short 2-process runs are launched, one with `fosc train --nproc 2`, one with
`python -m torch.distributed.run`; everything else runs in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fosctrain import cli
from fosctrain import train as train_mod
from fosctrain import trainer as trainer_mod
from fosctrain.attacks import PGD, PGDL2
from fosctrain.checkpoint import load_checkpoint
from fosctrain.commands import train as train_cmd
from fosctrain.config import resolve
from fosctrain.distributed import Dist, free_port
from fosctrain.errors import UserError
from fosctrain.rundir import LOCK_NAME
from fosctrain.validation import val_accuracy

# Global batch 64, two batches per epoch; each of 2 ranks takes 32 rows of every batch. SGD,
# pinned: Adam's first steps move every weight by about lr * sign(gradient), which turns the
# tiny differences compared here into larger ones (see docs/DISTRIBUTED.md).
RUN = dict(method="madry", train_n=128, epochs=2, batch_size=64, steps=3, val_n=64, eval_steps=3)
RUN.update(optimizer="sgd", lr=0.01, momentum=0.9)
# One global batch of 95 rows (uneven shards: 48 + 47) from the initial model.
DAT = dict(method="dat", c_max=0.5, train_n=95, batch_size=95, epochs=1, steps=3, val_n=16)
DAT.update(eval_steps=1)


def flags(options: dict) -> list[str]:
    return train_cmd.to_flags({**options, "threads": 1}) + ["--no-progress"]


def launch(cmd: list[str], cwd=None, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The RUN configuration trained by 2 processes (`fosc train --nproc 2`, saving after
    every batch too) and by this process."""
    root = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "fosctrain", "train", "--nproc", "2", "--runs-dir", str(root)]
    done = launch([*cmd, "--name", "two", "--checkpoint-every", "1", *flags(RUN)], root)
    assert done.returncode == 0, done.stderr[-3000:]
    one = train_mod.train(resolve(overrides={**RUN, "threads": 1}), root / "one", progress=False)
    return {"root": root, "out": done, "one": one}


def test_two_processes_match_one_process(runs):
    """Two processes, global batch 64, agree with one process within these tolerances:

    - exactly: the files written, every count (gradient evaluations, steps) and the run's
      random stream (the generator state in the last checkpoint, bit for bit);
    - train loss and FOSC mean/median/p90 within 3% relative, the final weights within 3%
      relative L2 distance, validation accuracies within 4 of the 64 examples.

    Why not bit-identical: BatchNorm normalizes each rank's 32 rows with their own batch
    statistics (DDP's default; --sync-bn needs CUDA), not the 64-row batch's, so the training
    forward, loss and gradient differ slightly from the first step on, and gradients are
    summed in another order. Measured here: 0.1-0.7% on loss and FOSC, 0.3% on the weights,
    accuracies at most 1 of 64 examples apart.
    Everything else (order, augmentation, random starts, the attacks on the same model, the
    gradient average) is what one process does: the single-batch DAT test below is exact.
    """
    root = runs["root"]
    two, one = root / "two", root / "one"
    assert "2 processes" in runs["out"].stderr
    assert runs["out"].stdout.count("run:") == 1  # one report, from rank 0
    names = {p.name for p in two.iterdir()}
    assert names == {p.name for p in one.iterdir()}
    assert not [n for n in names if n.startswith(".") and n != LOCK_NAME]  # no temp files
    a, b = rows(two), rows(one)
    assert [r["epoch"] for r in a] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        for key in ("grad_evals", "attack_grad_evals", "steps_mean", "lr"):
            assert ra[key] == rb[key], key
        assert ra["attack_grad_evals"] == ra["epoch"] * 128 * 3
        for key in ("train_loss", "fosc_mean", "fosc_median", "fosc_p90"):
            assert ra[key] == pytest.approx(rb[key], rel=0.03), key
        for key in ("val_clean_acc", "val_robust_acc"):
            assert abs(ra[key] - rb[key]) <= 4 / 64, key
    wa, wb = load_file(str(two / "last.safetensors")), load_file(str(one / "last.safetensors"))
    assert wa.keys() == wb.keys()
    assert not [k for k in wa if "module." in k]
    weights = [k for k in wa if k.startswith("model/") and wa[k].is_floating_point()]
    flat_a = torch.cat([wa[k].flatten() for k in weights])
    flat_b = torch.cat([wb[k].flatten() for k in weights])
    assert (flat_a - flat_b).norm() / flat_b.norm() < 0.03
    rng_a = load_checkpoint(two, "last").state()["rng"]
    assert torch.equal(rng_a, load_checkpoint(one, "last").state()["rng"])


def test_sharded_evaluation_equals_single_process(runs):
    """The per-epoch validation ran sharded over 2 ranks; recomputed here in one process on the
    saved final model it gives the same numbers (the ranks' BN running statistics were averaged, so
    they all held the saved model)."""
    two = runs["root"] / "two"
    cfg = resolve(overrides={**RUN, "threads": 1})
    tr = train_mod.build_trainer(cfg, two, resume=True, progress=False)
    x, y = tr.data.x_val, tr.data.y_val
    again = val_accuracy(tr.model, x, y, cfg, cfg.seed + cfg.epochs - 1)
    final = rows(two)[-1]
    assert again["clean_acc"] == final["val_clean_acc"]
    assert again["robust_acc"] == final["val_robust_acc"]


def test_two_process_run_resumes_in_one_process(runs, tmp_path):
    """The last checkpoint lost: the run resumes in ONE process from `last-prev`, written by 2
    processes in the middle of epoch 2, and finishes with the same counts."""
    cut = tmp_path / "cut"
    shutil.copytree(runs["root"] / "two", cut)
    for name in ("last.json", "last.safetensors"):
        (cut / name).unlink()
    state = json.loads(load_checkpoint(cut, "last-prev").state()["run"])
    assert (state["epoch"], state["batch"]) == (1, 1)
    assert state["partial"]["n"] == 64  # the global batch's statistics, not one rank's
    cfg = resolve(overrides={**RUN, "threads": 1})
    resumed = train_mod.train(cfg, cut, resume=True, progress=False)
    whole = rows(runs["root"] / "two")[-1]
    assert resumed["epochs"] == 2 and len(rows(cut)) == 2
    assert resumed["grad_evals"] == whole["grad_evals"]
    for key in ("train_loss", "fosc_mean"):
        assert resumed["final"][key] == pytest.approx(whole[key], rel=0.03), key


def test_uneven_shards_from_the_same_model_are_exact(tmp_path):
    """torchrun, 2 processes, one global batch of 95 rows (shards of 48 and 47) from the initial
    model: DAT's attack, FOSC statistics and stopping decisions equal one process's exactly,
    because each rank's random starts are its rows of the global draw and the attack runs in
    eval mode (only the train-mode BN statistics of the training step differ)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(free_port()), "-m", "fosctrain", "train"]
    done = launch([*cmd, "--runs-dir", str(tmp_path), "--name", "two", *flags(DAT)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = resolve(overrides={**DAT, "threads": 1})
    one = train_mod.train(cfg, tmp_path / "one", progress=False)["final"]
    two = rows(tmp_path / "two")[0]
    for key in ("fosc_mean", "fosc_median", "fosc_p90", "steps_mean", "attack_grad_evals"):
        assert two[key] == one[key], key
    assert 0 < two["steps_mean"] < 3  # some samples stopped early, some did not
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=0.01)


def test_port_in_use_is_one_line_and_exit_2(capsys):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli.main(["train", "--nproc", "2", "--master-port", str(port), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and f"port {port}" in err and "in use" in err


def test_launch_options_under_torchrun_are_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "--nproc", "2", "--epochs", "1", "--runs-dir", "/nonexistent"]) == 2
    assert "under torchrun" in capsys.readouterr().err


def test_worker_arguments_parse_back_to_the_same_options(tmp_path):
    parser = cli.build_parser(["train"])
    given = ["train", "--nproc", "2", "--lr", "0.05", "--lr-milestones", "3", "5", "--c-max"]
    given += ["auto", "--no-random-start", "--model-kwargs", '{"in_channels": 1}', "--alpha"]
    given += ["none", "--eps=-0.1", "--amp", "bf16", "--checkpoint-every", "4"]
    args = parser.parse_args(given)
    argv = train_cmd.worker_argv(args, tmp_path / "runs" / "x")
    again = parser.parse_args(argv)
    assert train_cmd.overrides(again) == train_cmd.overrides(args)
    assert (again.name, again.runs_dir, again.nproc) == ("x", str(tmp_path / "runs"), 1)
    assert again.checkpoint_every == 4


def test_shards_cover_each_global_batch_once():
    for world in (1, 2, 3, 4):
        for n in (world, 7, 64, 95):
            parts = [Dist(rank=r, world=world).shard(n) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
            assert max(h - lo for lo, h in parts) - min(h - lo for lo, h in parts) <= 1
    assert Dist(world=3).loss_scale(33, 99) == 1


def test_uneven_shards_average_to_the_global_mean_loss():
    """DDP averages the ranks' gradients; with the loss scale that average is the gradient of
    the global batch's mean loss also when the shards are uneven."""
    losses = torch.rand(95, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for world in (2, 3, 4):
        total = 0.0
        for rank in range(world):
            d = Dist(rank=rank, world=world)
            lo, hi = d.shard(95)
            total += losses[lo:hi].mean().item() * d.loss_scale(hi - lo, 95)
        assert total / world == pytest.approx(losses.mean().item(), rel=1e-12)


@pytest.mark.parametrize(  # a negligible step: x_adv is the projected random start
    "attack", [PGD(eps=0.3, alpha=1e-9, steps=1), PGDL2(eps=1.0, alpha=1e-9, steps=1)]
)
def test_sharded_random_starts_are_the_global_draw(linear_model, attack):
    """Each rank's random starts are its rows of the single-process draw, and the generator
    ends where one process leaves it (L-inf and L2 starts)."""
    x = torch.rand(9, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(9, dtype=torch.long)
    whole_gen = torch.Generator().manual_seed(7)
    whole = attack(linear_model, x, y, generator=whole_gen).x_adv
    parts = []
    for rank in range(2):
        d = Dist(rank=rank, world=2)
        lo, hi = d.shard(9)
        gen = torch.Generator().manual_seed(7)
        start = d.random_starts(lo, hi, 9)
        parts.append(attack(linear_model, x[lo:hi], y[lo:hi], generator=gen, start=start).x_adv)
        assert torch.equal(gen.get_state(), whole_gen.get_state())
    assert torch.equal(torch.cat(parts), whole)


def test_world_size_limits_are_user_errors():
    cfg = resolve(overrides={**RUN, "batch_size": 50})  # 128 = 2 x 50 + 28
    trainer_mod.check_world(cfg, Dist(world=28), 128)
    with pytest.raises(UserError, match="at least 29 rows"):
        trainer_mod.check_world(cfg, Dist(world=29), 128)
    with pytest.raises(UserError, match="sync-bn needs CUDA"):
        trainer_mod.check_world(resolve(overrides={"sync_bn": True}), Dist(world=2), 128)


def _final(tmp_path, name, **kw):
    cfg = resolve(overrides={**RUN, "threads": 1, **kw})
    return train_mod.train(cfg, tmp_path / name, progress=False)["final"]


def test_bf16_autocast_matches_fp32(tmp_path):
    """--amp bf16 on CPU (autocast in the training forward and the attacks): bf16 keeps 8 bits
    of mantissa, so losses and FOSC move by about 1% here; 5% relative is the bound."""
    fp32, bf16 = _final(tmp_path, "fp32"), _final(tmp_path, "bf16", amp="bf16")
    for key in ("train_loss", "fosc_mean"):
        assert bf16[key] == pytest.approx(fp32[key], rel=0.05), key
    assert abs(bf16["val_clean_acc"] - fp32["val_clean_acc"]) <= 4 / 64


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("cc") and not shutil.which("gcc"), reason="no C compiler")
def test_compiled_training_step_matches_eager(tmp_path):
    """--compile: the training step through torch.compile (inductor, CPU) trains the same model
    up to kernel rounding (1e-5 relative measured; 1e-3 allowed). About 30 s of compiling."""
    compiled = _final(tmp_path, "compiled", compile=True)
    eager = _final(tmp_path, "eager")
    for key in ("train_loss", "fosc_mean"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-3), key
    assert compiled["val_clean_acc"] == eager["val_clean_acc"]


# Run in a fresh interpreter: with WORLD_SIZE set (as torchrun sets it) the command line's exit
# must skip interpreter finalization (distributed.leave), keeping its status and its output.
ENTRY = """
import atexit, sys
atexit.register(lambda: print("finalized"))
sys.argv = ["fosc", "train", "--nproc", "2", "--epochs", "1"]
from fosctrain.cli import entry
entry()
"""

# Why: once DDP wrapped a model, destroy_process_group leaves gloo's worker threads running
# (torch 2.13), and a rank that finalizes the interpreter beside them can abort (leave's
# docstring). Native threads are counted before and after, in a world of one process.
THREADS = """
import os, sys, torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
count = lambda: len(os.listdir("/proc/self/task"))
before = count()
dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
if sys.argv[1] == "ddp":
    DDP(torch.nn.Linear(2, 2))
dist.destroy_process_group()
print(count() - before)
"""


def python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return launch([sys.executable, "-c", code, *args], **env)


def test_a_rank_exits_with_its_status_and_output_but_without_finalizing():
    rank = python(ENTRY, WORLD_SIZE="2", RANK="0")
    assert rank.returncode == 2
    assert rank.stderr.count("\n") == 1 and "under torchrun" in rank.stderr
    assert "finalized" not in rank.stdout
    single = python(ENTRY.replace('"--nproc", "2", ', '"--nproc", "0", '))
    assert single.returncode == 2 and "--nproc" in single.stderr
    assert single.stdout == "finalized\n"  # outside torchrun the exit is Python's own


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_ddp_keeps_gloo_threads_after_destroy_process_group():
    """The reason for distributed.leave: should a torch release join gloo's threads on
    destroy_process_group also after DDP, this fails and leave may go."""
    plain, ddp = python(THREADS, "plain"), python(THREADS, "ddp")
    assert plain.returncode == 0 and ddp.returncode == 0, plain.stderr + ddp.stderr
    assert int(plain.stdout) == 0
    assert int(ddp.stdout) >= 2  # gloo's transport loop and its worker threads
