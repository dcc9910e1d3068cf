"""Metric backends (train.loggers): through a tiny toy2d run, every backend receives the records
the trainer logs (jsonl lines, TensorBoard scalars read back, wandb's offline run file, a plugin
registered here); recipe errors name the valid loggers."""
from __future__ import annotations

import glob
import importlib.util
import json
import struct
import time

import numpy as np
import pytest

from mfrecipes.errors import RecipeError
from mfrecipes.recipe import load_recipe
from mfrecipes.recipe.schema import ComponentCfg
from mfrecipes.build import check_recipe
from mfrecipes.registry import LOGGERS
from mfrecipes.run.layout import read_jsonl
from mfrecipes.train.log import MetricLogger, RunLogger, logger_blocks
from mfrecipes.train.loop import Trainer

TOY = """
run: {name: toy, seed: 5}
data: {name: toy2d, params: {kind: eight_gaussians, num_points: 1000}}
backbone: {name: mlp, params: {hidden: 16, depth: 2}}
train: {total_images: 320, global_batch_size: 64, lr: 1.0e-3, ema_decays: [0.9],
        log_every_images: 64, progress_bar: false, loggers: LOGGERS}
eval: {at_end: false}
"""


def _run(tmp_path, loggers: str) -> list[dict]:
    (tmp_path / "r.yaml").write_text(TOY.replace("LOGGERS", loggers))
    recipe, data = load_recipe(str(tmp_path / "r.yaml"))
    check_recipe(recipe)
    Trainer(recipe, data, str(tmp_path / "run")).run()
    return read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))


def _training_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "obj/v_loss" in r]


class _Memory(MetricLogger):
    """Keeps what it receives (a plugin-style backend)."""

    def __init__(self, prefix: str = "", *, run_dir: str):
        self.prefix, self.run_dir, self.closed = prefix, run_dir, False
        self.records = []
        self.images = []

    def log(self, record):
        self.records.append(dict(record))

    def log_image(self, tag, image, step):
        self.images.append((tag, image.shape, step))

    def close(self):
        self.closed = True
        _Memory.last = self


@pytest.fixture
def memory_logger():
    LOGGERS.register("memory_test")(_Memory)
    yield _Memory
    LOGGERS.unregister("memory_test")


def test_jsonl_tensorboard_and_a_plugin_receive_the_trainers_records(tmp_path, memory_logger):
    pytest.importorskip("tensorboard")
    records = _run(tmp_path, "[jsonl, tensorboard, {name: memory_test, params: {prefix: p}}]")
    train = _training_records(records)
    assert [r["images"] for r in train] == [64, 128, 192, 256, 320]
    assert all({"loss", "obj/u_err", "img_per_s", "time"} <= set(r) for r in train)
    # the plugin got exactly the lines metrics.jsonl holds, in order, and was closed
    plugin = memory_logger.last
    assert plugin.closed and plugin.prefix == "p" and plugin.run_dir == str(tmp_path / "run")
    assert plugin.records == records

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    for key in ("obj/v_loss", "obj/u_err", "loss", "lr"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["images"] for r in train]
        assert [e.value for e in events] == pytest.approx([r[key] for r in train], rel=1e-6)
    assert "time" not in acc.Tags()["scalars"] and "images" not in acc.Tags()["scalars"]


def test_default_is_jsonl_plus_tensorboard_and_grids_reach_every_backend(tmp_path,
                                                                          memory_logger):
    expected = ["jsonl"] + (["tensorboard"] if importlib.util.find_spec("tensorboard") else [])
    assert [b["name"] for _, b in logger_blocks(None)] == expected
    log = RunLogger(str(tmp_path), total_images=10, start_images=0,
                    loggers=("jsonl", "memory_test"))
    grid = np.zeros((12, 20, 3), np.uint8)
    log.image("samples/nfe1", grid, 10)
    log.log({"images": 10, "step": 1, "loss": float("nan")}, echo=False)
    log.close()
    plugin = memory_logger.last
    assert plugin.images == [("samples/nfe1", (12, 20, 3), 10)]
    assert plugin.records[0]["loss"] == "nan"           # JSON-ready, as metrics.jsonl has it
    assert not (tmp_path / "tensorboard").exists()      # not asked for: not written


def test_warnings_reach_tensorboard_as_text(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLogger(str(tmp_path), total_images=10, start_images=0,
                    loggers=("jsonl", "tensorboard"))
    log.warning("loss weighting returned a huge value", images=8, step=1)
    log.warning("console only")                        # no images: not a record
    log.close()
    (rec,) = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert rec["warning"] == "loss weighting returned a huge value" and rec["images"] == 8
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    (event,) = acc.Tensors("warnings/text_summary")
    assert event.step == 8
    assert event.tensor_proto.string_val[0].decode() == "loss weighting returned a huge value"


def _wandb_history(path: str) -> list[dict]:
    """History rows of a wandb run file: 32 KiB blocks of chunks (crc u32, length u16, type u8;
    1 = full, 2/3/4 = first/middle/last) after a 7-byte header, each record a protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, chunk, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:          # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + n > len(data):          # a chunk still being written
            break
        chunk += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in rec.history.item})
    return rows


def _wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wb" / var.lower()))  # nothing outside tmp_path


def _wandb_rows(tmp_path, want, n):
    (run_file,) = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "*.wandb"))
    deadline = time.time() + 30
    while True:  # wandb's service process may still be writing the file when finish() returns
        rows = [r for r in _wandb_history(run_file) if want in r]
        if len(rows) >= n or time.time() > deadline:
            return run_file, rows
        time.sleep(0.5)


def test_warnings_reach_wandb_as_a_history_column(tmp_path, monkeypatch):
    _wandb_offline(tmp_path, monkeypatch)
    (tmp_path / "run").mkdir()
    log = RunLogger(str(tmp_path / "run"), total_images=10, start_images=0,
                    loggers=("jsonl", ComponentCfg(name="wandb", params={"project": "toy"})))
    log.log({"images": 4, "step": 1, "loss": 0.5}, echo=False)
    log.warning("grad norm was not finite; step skipped", images=8, step=2)
    log.close()
    _, rows = _wandb_rows(tmp_path, "warning", 1)
    assert [(r["images"], r["warning"]) for r in rows] == [
        (8, "grad norm was not finite; step skipped")]


def test_wandb_offline_run_holds_the_logged_figures(tmp_path, monkeypatch):
    _wandb_offline(tmp_path, monkeypatch)
    records = _run(tmp_path, "[jsonl, {name: wandb, params: {project: toy}}]")
    train = _training_records(records)
    run_file, rows = _wandb_rows(tmp_path, "obj/v_loss", len(train))
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert run_file.endswith(f"run-{run_id}.wandb")
    assert [r["images"] for r in rows] == [r["images"] for r in train]
    for key in ("obj/v_loss", "obj/u_err", "loss", "grad_norm"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in train], rel=1e-9)


def test_unknown_or_incomplete_logger_lists_are_recipe_errors(tmp_path):
    for loggers, path, words in [
        ("[jsonl, tensorbord]", "train.loggers[1].name", ["did you mean 'tensorboard'",
                                                          "jsonl", "wandb"]),
        ("[jsonl, {name: wandb, params: {projekt: x}}]", "train.loggers[1].params.projekt",
         ["did you mean 'project'"]),
        ("[tensorboard]", "train.loggers", ["must include 'jsonl'"]),
        ("[jsonl, jsonl]", "train.loggers[1]", ["listed twice"]),
    ]:
        (tmp_path / "r.yaml").write_text(TOY.replace("LOGGERS", loggers))
        recipe, _ = load_recipe(str(tmp_path / "r.yaml"))
        with pytest.raises(RecipeError) as info:
            check_recipe(recipe)
        assert info.value.path == path, loggers
        assert all(w in str(info.value) for w in words), str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_missing_optional_package_names_its_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "tensorboard")
                        else real(name, *a))
    with pytest.raises(RecipeError) as info:
        logger_blocks(("jsonl", "wandb"))
    assert "mfrecipes[wandb]" in str(info.value) and info.value.path == "train.loggers[1]"
    with pytest.raises(RecipeError) as info:
        logger_blocks(("jsonl", "tensorboard"))
    assert "mfrecipes[tensorboard]" in str(info.value)
    assert [b["name"] for _, b in logger_blocks(None)] == ["jsonl"]  # as before: jsonl only


def test_wandb_reopened_in_a_run_directory_keeps_its_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from mfrecipes.train.log import WandbLogger

    for var, sub in (("WANDB_MODE", None), ("WANDB_DIR", "wb"), ("WANDB_CACHE_DIR", "c"),
                     ("WANDB_CONFIG_DIR", "cf"), ("WANDB_DATA_DIR", "d")):
        monkeypatch.setenv(var, "offline" if sub is None else str(tmp_path / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for images in (64, 128):  # a run, then its resumption
        w = WandbLogger(run_dir=str(tmp_path))
        w.log({"images": images, "step": 1, "time": 0.0, "loss": 1.0})
        w.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    files = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)
