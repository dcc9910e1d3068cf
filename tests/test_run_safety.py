"""Runs you can trust: nothing from a run directory runs as code, no secrets on disk, one writer,
resume checks before it writes, damaged checkpoints are reported and skipped, no non-finite save.

Real components throughout: real ``mfr`` processes for the lock and the CLI, real torch pickles
with a payload that would write a marker file if it were ever unpickled.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from data_fixtures import write_wds_shards
from shared_parts import TOY_RECIPE
from mfrecipes.errors import CheckpointError, RecipeError, TrainingError
from mfrecipes.recipe import load_recipe
from mfrecipes.run import layout
from mfrecipes.train import checkpoint as ckpt
from mfrecipes.train.loop import Trainer

TOY = TOY_RECIPE.replace("{name: progressive, params: {mc_draws: 20000}}",
                        "{name: constant, params: {}}")
CLI = [sys.executable, "-m", "mfrecipes.cli"]


def _env(tmp_path) -> dict:
    return dict(os.environ, MFR_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO),
                OMP_NUM_THREADS="1")


def mfr(tmp_path, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=_env(tmp_path), timeout=timeout)


def cli(capsys, *args) -> tuple[int, str, str]:
    """``mfr ARGS`` in this process (the code path of the command line, without the start-up
    cost of a new interpreter): exit code, stdout, stderr."""
    from mfrecipes.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def train(tmp_path, run_dir, overrides=(), **kw):
    path = tmp_path / "r.yaml"
    path.write_text(TOY)
    recipe, data = load_recipe(str(path), overrides)
    return Trainer(recipe, data, str(run_dir), **kw).run()


def resume(run_dir, overrides=(), **kw):
    recipe, data = load_recipe(str(Path(run_dir) / "recipe.resolved.yaml"), overrides)
    return Trainer(recipe, data, str(run_dir), **kw).run()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished toy run with checkpoints at 640 and 1280 images (copied by each test)."""
    root = tmp_path_factory.mktemp("safety")
    train(root, root / "run")
    return root / "run"


def copy_run(src, dst) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return Path(dst)


def all_files(run_dir) -> dict[str, bytes]:
    """Every file's bytes, but the lock file's (it names whoever holds the lock now)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in Path(run_dir).rglob("*")
            if p.is_file() and p.name != ".lock"}


def reseal(folder) -> None:
    """Rewrite meta.json's checksums to match the files (as an attacker would)."""
    meta = json.loads((Path(folder) / ckpt.META).read_text())
    meta["files"] = {fn: ckpt.file_digest(str(Path(folder) / fn)) for fn in meta["files"]}
    (Path(folder) / ckpt.META).write_text(json.dumps(meta))


class Payload:
    """Unpickling this runs ``exec``: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def plant_pickle(path, marker) -> None:
    with open(path, "wb") as f:
        pickle.dump({"state": Payload(marker)}, f)


# -- 1. no code from data ----------------------------------------------------------------------
def test_planted_train_state_and_recipe_tag_do_not_run(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    marker = tmp_path / "ran"
    newest = run_dir / "checkpoints" / ckpt.checkpoint_name(1280)
    plant_pickle(newest / ckpt.STATE, marker)
    reseal(newest)  # the checksum matches: only the unpickler stands in the way
    code, _, err = cli(capsys, "run", run_dir, "train.total_images=1344")
    assert code == 0, err
    assert not marker.exists()
    text = "".join(err.split())  # rich wraps long lines, paths included
    assert f"damagedcheckpointfile{newest / ckpt.STATE}" in text, err
    assert "resumingfromimg-000000000640instead" in text
    assert (run_dir / "checkpoints" / f"damaged-{newest.name}").is_dir()  # kept, not deleted

    # A YAML tag that would call os.system in the recorded recipe.
    resolved = run_dir / "recipe.resolved.yaml"
    resolved.write_text(resolved.read_text() + f"\nx: !!python/object/apply:os.system "
                                                f"['touch {marker}']\n")
    code, _, err = cli(capsys, "run", run_dir)
    assert code == 2 and "recipe.resolved.yaml" in err and not marker.exists()


def test_sample_does_not_import_a_foreign_runs_modules(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    marker = tmp_path / "imported"
    module = tmp_path / "evil_plugin.py"
    module.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    resolved = run_dir / "recipe.resolved.yaml"
    resolved.write_text(resolved.read_text().replace("imports: []", f"imports: [{module}]"))
    assert f"imports: [{module}]" in resolved.read_text()
    for cmd in ("sample", "eval"):
        code, _, err = cli(capsys, cmd, run_dir, "--num", "8", "--device", "cpu")
        assert code == 2, err
        assert "--allow-imports" in err and not marker.exists()
    try:
        code, _, err = cli(capsys, "sample", run_dir, "--num", "8", "--device", "cpu",
                           "--allow-imports", "--out", tmp_path / "s")
        assert code == 0, err
        assert marker.exists()  # the flag does what it says
    finally:
        sys.modules.pop("mfr_local_evil_plugin", None)


# -- 2. no secrets on disk ---------------------------------------------------------------------
def test_planted_secrets_reach_no_file(tmp_path, capsys, monkeypatch):
    write_wds_shards(tmp_path / "shards", 64, 16)
    secrets = ["AKIAPLANTED0001", "s3cr3tPLANTED0002", "tokPLANTED0003", "pwPLANTED0004",
               "blockPLANTED0005"]
    recipe = TOY.replace(
        "data: {name: toy2d, params: {kind: eight_gaussians, num_points: 2000}}",
        "data: {name: shards, params: {urls: '" + str(tmp_path / "shards") +
        "/shard-{000000..000003}.tar', storage_options: {key: " + secrets[0] + "}}}")
    (tmp_path / "r.yaml").write_text(recipe.replace("total_images: 1280", "total_images: 256")
                                     .replace("checkpoint_every_images: 640",
                                              "checkpoint_every_images: 128"))
    urls = str(tmp_path / "shards") + "/shard-{000000..000003}.tar"
    args = ["run", str(tmp_path / "r.yaml"),
            # a whole-block override, a dotted one, and a secret in a free-form block
            f"data.params={{urls: '{urls}', storage_options: {{key: {secrets[0]}, "
            f"secret: {secrets[1]}, client_kwargs: {{aws_session_token: {secrets[2]}}}}}}}",
            f"deepspeed.config={{monitor: {{wandb: {{password: {secrets[3]}}}}}}}",
            f"data.params.storage_options.token={secrets[4]}", "--out", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", ["mfr", *args])  # what env.json and the history record
    code, stdout, stderr = cli(capsys, *args)
    assert code == 0, stderr
    files = all_files(tmp_path / "run")
    assert "recipe.resolved.yaml" in files and "env.json" in files and "history.jsonl" in files
    found = [(name, s) for name, data in files.items() for s in secrets if s.encode() in data]
    print(f"planted secrets: {len(secrets)}; found on disk: {len(found)} in {len(files)} files")
    assert not found
    assert not any(s in stdout + stderr for s in secrets)
    assert "***" in files["env.json"].decode()
    # The shard member name merely looks like a key: kept.
    assert "data.params.key" not in files["recipe.resolved.yaml"].decode()

    # An error message that echoes a value does not show a secret either.
    code, _, err = cli(capsys, "run", tmp_path / "r.yaml",
                       f"data.params.storage_options={{key: {secrets[0]}}}",
                       f"train.lr={secrets[0]}", "--out", tmp_path / "run2")
    assert code == 2 and "train.lr" in err and secrets[0] not in err


# -- 5. one writer -----------------------------------------------------------------------------
def test_second_writer_is_refused_with_holder_pid_and_host(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(TOY.replace("total_images: 1280", "total_images: 10000000")
                                     .replace("checkpoint_every_images: 640",
                                              "checkpoint_every_images: 6400"))
    run_dir = tmp_path / "run"
    first = subprocess.Popen([*CLI, "run", str(tmp_path / "r.yaml"), "--out", str(run_dir)],
                             cwd=REPO, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while not (run_dir / "metrics.jsonl").is_file():  # training, so holding the lock
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        before = all_files(run_dir)
        code, _, err = cli(capsys, "run", run_dir)  # this process: the second writer
        err = " ".join(err.split())
        assert code == 2, err
        assert f"in use by pid {first.pid} on host {socket.gethostname()}" in err
        code, _, err = cli(capsys, "run", tmp_path / "r.yaml", "--out", run_dir)
        assert code == 2 and f"pid {first.pid}" in " ".join(err.split())
        # it wrote nothing; the first writer, still training, may add its own event files,
        # checkpoints and grids meanwhile
        new = set(all_files(run_dir)) - set(before)
        assert all(p.startswith(("tensorboard", "checkpoints", "samples")) for p in new), new
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a crash: the kernel releases the lock
        first.wait()
    code, _, err = cli(capsys, "run", run_dir, "train.total_images=1280")
    assert code == 0, err
    events = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [e["who"]["pid"] for e in events] == [first.pid, os.getpid()]


# -- 6. resume never damages a run -------------------------------------------------------------
@pytest.mark.parametrize("override,path", [
    ("backbone.params.hidden=64", "backbone.params.hidden"),
    ("objective.name=flow_matching", "objective.name"),
    ("train.ema_decays=[0.9]", "train.ema_decays"),
])
def test_resume_refuses_other_keys_and_writes_nothing(finished, tmp_path, override, path,
                                                      capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    before = all_files(run_dir)
    code, _, err = cli(capsys, "run", run_dir, override, "train.total_images=1344")
    assert code == 2 and path in err
    assert all_files(run_dir) == before
    with pytest.raises(RecipeError, match=path.replace(".", r"\.")):
        resume(run_dir, [override])
    assert all_files(run_dir) == before


def test_resume_appends_history_and_missing_ema_is_refused(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    out = resume(run_dir, ["train.total_images=1344", "train.log_every_images=64"])
    assert out["images"] == 1344
    lines = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [e["event"] for e in lines] == ["start", "resume"]
    last = lines[-1]
    assert last["images"] == 1280 and last["checkpoint"] == ckpt.checkpoint_name(1280)
    assert last["changed"]["train.total_images"] == {"from": 1280, "to": 1344}
    assert last["who"]["pid"] == os.getpid() and last["time"]

    # A checkpoint without one of the recipe's EMAs.
    from safetensors.torch import save_file

    newest = Path(ckpt.latest_checkpoint(str(run_dir / "checkpoints")))
    groups = ckpt.load_weights(str(newest))
    del groups["ema_0.99"]
    save_file({f"{g}/{k}": v for g, sd in groups.items() for k, v in sd.items()},
              str(newest / ckpt.WEIGHTS))
    reseal(newest)
    before = all_files(run_dir)
    with pytest.raises(CheckpointError, match="no EMA ema_0.99.*--init-missing-ema"):
        resume(run_dir, ["train.total_images=1408"])
    assert all_files(run_dir) == before
    resume(run_dir, ["train.total_images=1408"], init_missing_ema=True)
    last = json.loads((run_dir / "history.jsonl").read_text().splitlines()[-1])
    assert any("ema_0.99" in n and "raw weights" in n for n in last["notes"])


# -- 7. damaged checkpoints --------------------------------------------------------------------
def _truncate(p):
    p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])


def _flip(p):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", [
    ("weights truncated", ckpt.WEIGHTS, _truncate),
    ("train state bit flip", ckpt.STATE, _flip),
    ("binary meta.json", ckpt.META, lambda p: p.write_bytes(os.urandom(200))),
    ("meta.json not a record", ckpt.META, lambda p: p.write_text("[1, 2]")),
], ids=lambda d: d[0])
def test_damaged_checkpoint_falls_back_to_the_previous(finished, tmp_path, damage):
    _, fn, hurt = damage
    run_dir = copy_run(finished, tmp_path / "run")
    newest = run_dir / "checkpoints" / ckpt.checkpoint_name(1280)
    hurt(newest / fn)
    trainer_out = resume(run_dir, ["train.total_images=1280"])
    assert trainer_out["images"] == 1280
    kept = run_dir / "checkpoints" / f"damaged-{newest.name}"
    assert kept.is_dir() and (kept / fn).is_file()
    note = json.loads((run_dir / "history.jsonl").read_text().splitlines()[-1])["notes"][0]
    assert str(newest / fn) in note and "resuming from img-000000000640" in note
    assert "\n" not in note


def test_no_checkpoint_verifies_is_one_clear_error(finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    for name in (640, 1280):
        (run_dir / "checkpoints" / ckpt.checkpoint_name(name) / ckpt.META).write_bytes(b"\xff\x00")
    before = all_files(run_dir)
    code, _, err = cli(capsys, "run", run_dir)
    assert code == 2 and "no checkpoint" in err and ckpt.META in err
    assert all_files(run_dir) == before


def test_failed_checkpoint_write_is_a_clear_message(finished, tmp_path, capsys):
    """A write beyond the file-size limit: the kernel refuses it (EFBIG) as a full disk would
    (ENOSPC); the limit is lifted again before the test ends."""
    import resource

    run_dir = copy_run(finished, tmp_path / "run")
    limit = os.path.getsize(run_dir / "checkpoints" / ckpt.checkpoint_name(1280) / ckpt.STATE)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    recipe, data = load_recipe(str(run_dir / "recipe.resolved.yaml"), ["train.total_images=1344"])
    trainer = Trainer(recipe, data, str(run_dir))  # its data cached before the limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit - 1, hard))
    try:
        with pytest.raises(CheckpointError) as err:
            trainer.run()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    text = str(err.value)
    assert "cannot write checkpoint img-000000001344" in text and "File too large" in text
    assert "img-000000001280 is intact" in text and "\n" not in text
    names = sorted(os.listdir(run_dir / "checkpoints"))
    assert not any(n.startswith(".tmp-") for n in names)
    layout.verify_checkpoint(str(run_dir / "checkpoints" / ckpt.checkpoint_name(1280)))


# -- 4. no non-finite checkpoint ---------------------------------------------------------------
def test_update_that_blows_up_stops_before_any_save(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(TOY)
    recipe, data = load_recipe(str(path))
    trainer = Trainer(recipe, data, str(tmp_path / "run"))
    real_step = trainer.engine.step

    def step():  # from 704 images on, the learning rate is infinite (train.lr=.inf)
        if trainer.images >= 704:
            for g in trainer.engine.optimizer.param_groups:
                g["lr"] = float("inf")
        real_step()

    trainer.engine.step = step
    with pytest.raises(TrainingError) as err:
        trainer.run()
    msg = str(err.value)
    assert "not finite after the update at 704 images" in msg
    assert f"last good checkpoint is {tmp_path / 'run' / 'checkpoints' / 'img-000000000640'}" \
        in msg
    names = layout.checkpoints_newest_first(str(tmp_path / "run" / "checkpoints"))
    assert [os.path.basename(n) for n in names] == ["img-000000000640"]
    groups = ckpt.load_weights(names[0])
    assert all(torch.isfinite(v).all() for g in groups.values() for v in g.values())


def test_blow_up_before_any_checkpoint_says_none_exists(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(TOY)
    recipe, data = load_recipe(str(path))
    trainer = Trainer(recipe, data, str(tmp_path / "run"))
    for g in trainer.engine.optimizer.param_groups:
        g["weight_decay"] = float("inf")
    with pytest.raises(TrainingError, match="no good checkpoint exists"):
        trainer.run()
    assert not layout.checkpoints_newest_first(str(tmp_path / "run" / "checkpoints"))


# -- DeepSpeed: its files are never unpickled; the ranks share the lock --------------------------
@pytest.mark.slow
def test_deepspeed_resume_ignores_planted_files_and_ranks_share_the_lock(tmp_path):
    import shutil

    from ds_launch import RECIPE, final_weights, spawn, run as ds_run

    (tmp_path / "r.yaml").write_text(RECIPE)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ds_run([str(tmp_path / "r.yaml"), "--out", str(ref)], 2, tmp_path / "ref.log")
    shutil.copytree(ref, cut)
    shutil.rmtree(cut / "checkpoints" / ckpt.checkpoint_name(320))
    (cut / "checkpoints" / "latest").write_text(ckpt.checkpoint_name(160) + "\n")
    marker = tmp_path / "ran"
    native = cut / "checkpoints" / ckpt.checkpoint_name(160) / "deepspeed" / "state"
    planted = sorted(native.glob("*.pt"))
    assert len(planted) == 3  # mp_rank_00_model_states.pt and one optimiser file per rank
    for f in planted:
        plant_pickle(f, marker)

    # A real process holds the lock: both ranks are refused, neither hangs.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; "
                               "from mfrecipes.run.records import RunLock; "
                               f"RunLock({str(cut)!r}).acquire(); print('locked', flush=True); "
                               "time.sleep(600)"], cwd=REPO, env=_env(tmp_path),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        log = tmp_path / "refused.log"
        procs = spawn([str(cut)], 2, log)
        codes = [p.wait(timeout=240) for p in procs]
        assert codes == [2, 2], log.read_text()[-3000:]
        assert f"in use by pid {holder.pid}" in " ".join(log.read_text().split())
    finally:
        holder.kill()
        holder.wait()

    ds_run([str(cut)], 2, tmp_path / "resume.log")
    assert not marker.exists()
    a, b = final_weights(ref), final_weights(cut)
    for group in a:
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), f"{group}.{key}"
