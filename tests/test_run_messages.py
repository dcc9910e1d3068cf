"""Messages a run can be trusted by: warnings from inside a training step reach the console and
every metric backend with their images and step; ``mfr check --world-size`` and ``mfr run``
under a launcher refuse a global batch that does not split over the ranks, before any file."""
from __future__ import annotations

import pytest

from mfrecipes.cli import main
from mfrecipes.objectives.flow_matching import FlowMatching
from mfrecipes.recipe import load_recipe
from mfrecipes.registry import LOGGERS, OBJECTIVES
from mfrecipes.run.layout import read_jsonl
from mfrecipes.train.log import MetricLogger
from mfrecipes.train.loop import Trainer

TOY = """
run: {name: toy, seed: 5}
data: {name: toy2d, params: {kind: eight_gaussians, num_points: 1000}}
backbone: {name: mlp, params: {hidden: 16, depth: 2}}
train: {total_images: 320, global_batch_size: 64, lr: 1.0e-3, ema_decays: [0.9],
        log_every_images: 64, progress_bar: false, loggers: [jsonl, warn_memory]}
eval: {at_end: false}
"""


class _Memory(MetricLogger):
    def __init__(self, *, run_dir: str):
        self.records = []
        _Memory.last = self

    def log(self, record):
        self.records.append(dict(record))


@pytest.fixture
def nan_on_call_2():
    @OBJECTIVES.register("nan_on_call_2")
    class NanOnCall2(FlowMatching):
        calls = 0

        def __call__(self, net, x, y, t, r, noise, *, progress, ema_net=None):
            out = super().__call__(net, x, y, t, r, noise, progress=progress, ema_net=ema_net)
            if NanOnCall2.calls == 2:
                out.err = out.err * float("nan")
            NanOnCall2.calls += 1
            return out
    LOGGERS.register("warn_memory")(_Memory)
    yield
    OBJECTIVES.unregister("nan_on_call_2")
    LOGGERS.unregister("warn_memory")


def test_non_finite_warning_goes_through_the_run_logger(tmp_path, capsys, nan_on_call_2):
    (tmp_path / "r.yaml").write_text(TOY)
    recipe, data = load_recipe(str(tmp_path / "r.yaml"),
                               ["objective.name=nan_on_call_2", "train.max_nonfinite=2"])
    capsys.readouterr()
    out = Trainer(recipe, data, str(tmp_path / "run")).run()
    assert out["nonfinite"] == 1
    err = capsys.readouterr().err
    assert "warning: non-finite loss/gradient at 128 images (1/2 allowed); update skipped" in err
    warned = [r for r in _Memory.last.records if "warning" in r]
    assert [(r["images"], r["step"]) for r in warned] == [(128, 2), (320, 5)]  # + the summary
    assert warned[0]["warning"].startswith("non-finite loss/gradient at 128 images")
    assert "1 update(s) were skipped" in warned[1]["warning"]
    on_disk = [r for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if "warning" in r]
    assert on_disk == warned  # metrics.jsonl holds what every backend got


def test_library_code_has_no_bare_print():
    """Library warnings go through the run logger or logging; only the CLI prints."""
    import ast
    import pathlib

    import mfrecipes

    root = pathlib.Path(mfrecipes.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "print"):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, found


# -- the global batch against the world size ----------------------------------------------------
def _recipe(tmp_path) -> str:
    text = TOY.replace("loggers: [jsonl, warn_memory]", "loggers: [jsonl]")
    (tmp_path / "r.yaml").write_text(text)
    return str(tmp_path / "r.yaml")


def _check(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("overrides, world, message", [
    (["train.global_batch_size=24", "train.micro_batch_size=4"], 4,
     "train.global_batch_size 24 is not divisible by the world size 4 x micro_batch_size 4 "
     "(global = micro x accumulation steps x world size); valid global batch sizes near it: "
     "16, 32 (any multiple of 16)"),
    (["train.global_batch_size=30"], 4,
     "train.global_batch_size 30 is not divisible by the world size 4 (train.micro_batch_size "
     "unset: each rank takes global / world size); valid global batch sizes near it: 28, 32 "
     "(any multiple of 4), or set train.micro_batch_size"),
    (["train.global_batch_size=6", "train.micro_batch_size=3"], 8,
     "valid global batch sizes near it: 24 (any multiple of 24)"),
])
def test_check_world_size_names_the_key_and_valid_sizes(tmp_path, capsys, monkeypatch,
                                                       overrides, world, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    r = _recipe(tmp_path)
    code, err = _check(capsys, "check", r, "engine=deepspeed", *overrides, "--world-size", world)
    assert code == 2 and message in err and err.count("error:") == 1
    # the same from the launcher's environment, and fine on one rank
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert _check(capsys, "check", r, "engine=deepspeed", *overrides)[1].count(message) == 1
    assert _check(capsys, "check", r, "engine=deepspeed", *overrides,
                  "--world-size", "1")[0] == 0


def test_check_world_size_accepts_a_split_that_comes_out_even(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    r = _recipe(tmp_path)
    assert _check(capsys, "check", r, "engine=deepspeed", "train.micro_batch_size=8",
                  "--world-size", "4")[0] == 0  # 64 = 8 x 2 x 4
    code, err = _check(capsys, "check", r, "--world-size", "2")  # the single engine
    assert code == 2 and "engine: engine 'single' trains in one process" in err
    monkeypatch.setenv("WORLD_SIZE", "four")
    code, err = _check(capsys, "check", r)
    assert code == 2 and "WORLD_SIZE environment variable must be an integer" in err


def test_run_under_a_launcher_refuses_the_batch_before_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    r = _recipe(tmp_path)
    code, err = _check(capsys, "run", r, "engine=deepspeed", "--out", tmp_path / "run")
    assert code == 2 and "train.global_batch_size 64 is not divisible by the world size 3" in err
    assert "63, 66" in err
    assert not (tmp_path / "run").exists()


# -- mfr show and the run's record fill in logger parameters ------------------------------------
class _WithParams(MetricLogger):
    def __init__(self, prefix: str = "p0", every: int = 3, tags=("a", "b"), *, run_dir: str):
        self.prefix = prefix

    def log(self, record):
        pass


@pytest.fixture
def param_logger():
    LOGGERS.register("param_test")(_WithParams)
    yield
    LOGGERS.unregister("param_test")


def test_show_and_the_record_fill_in_logger_defaults(tmp_path, capsys, param_logger):
    import yaml

    (tmp_path / "r.yaml").write_text(TOY.replace("[jsonl, warn_memory]",
                                                 "[jsonl, {name: param_test, params: {every: 5}}]"))
    capsys.readouterr()
    assert main(["show", str(tmp_path / "r.yaml")]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)["train"]["loggers"]
    assert shown == [{"name": "jsonl", "params": {}},
                     {"name": "param_test", "params": {"prefix": "p0", "every": 5,
                                                       "tags": ["a", "b"]}}]
    assert main(["show", str(tmp_path / "r.yaml"), "train.loggers=[jsonl, param_test]"]) == 0
    named = yaml.safe_load(capsys.readouterr().out)["train"]["loggers"][1]
    assert named == {"name": "param_test", "params": {"prefix": "p0", "every": 3,
                                                      "tags": ["a", "b"]}}
    # the run directory records the same, and resuming it is no change
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")]) == 0
    recorded = yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text())
    assert recorded["train"]["loggers"] == shown
    assert main(["run", str(tmp_path / "run"), "train.total_images=384"]) == 0
    history = [__import__("json").loads(line) for line in
               (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["changed"] == {"train.total_images": {"from": 320, "to": 384}}


# -- pictures that explain themselves: scatter plots and latent grids ------------------------------
def test_scatter_of_a_conditional_run_has_the_title_and_one_colour_per_class(tmp_path,
                                                                           monkeypatch):
    from data_fixtures import write_class_blobs
    from mfrecipes import plots

    write_class_blobs(tmp_path / "blobs", 400, 100)
    (tmp_path / "r.yaml").write_text(f"""
run: {{name: blobs, seed: 1}}
data: {{name: shards, params: {{urls: "{tmp_path}/blobs/shard-{{000000..000003}}.tar"}}}}
backbone: {{name: mlp, params: {{hidden: 16, depth: 2}}}}
train: {{total_images: 128, global_batch_size: 64, ema_decays: [0.9], progress_bar: false}}
eval: {{at_end: true, nfe: [1, 2], num_samples: 200}}
""")
    calls, figures = [], []
    real_scatter, real_save = plots.save_scatter, plots._save_figure

    def scatter(points, path, **kw):
        calls.append((points.shape, kw))
        return real_scatter(points, path, **kw)

    def save(fig, path):
        figures.append(fig)
        return real_save(fig, path)
    monkeypatch.setattr(plots, "save_scatter", scatter)
    monkeypatch.setattr(plots, "_save_figure", save)
    recipe, data = load_recipe(str(tmp_path / "r.yaml"))
    Trainer(recipe, data, str(tmp_path / "run")).run()
    assert [kw["title"] for _, kw in calls] == ["blobs | 1-NFE | 128 images | EMA ema_0.9",
                                                "blobs | 2-NFE | 128 images | EMA ema_0.9"]
    for (shape, kw), fig in zip(calls, figures):
        assert kw["labels"].tolist() == [i % 10 for i in range(shape[0])]  # balanced labels
        ax = fig.axes[0]
        assert ax.get_title() == kw["title"]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == ["reference"] + [f"class {c}" for c in range(10)]
        colours = {tuple(c.get_facecolor()[0][:3]) for c in ax.collections[1:]}
        assert len(colours) == 10  # one colour per class, none the reference's grey
        assert tuple(ax.collections[0].get_facecolor()[0][:3]) not in colours


def test_scatter_without_labels_is_one_sample_colour_and_names_classes_when_given(tmp_path,
                                                                                monkeypatch):
    import torch

    from mfrecipes import plots

    figures = []
    real_save = plots._save_figure
    monkeypatch.setattr(plots, "_save_figure", lambda fig, path: (figures.append(fig),
                                                                  real_save(fig, path))[1])
    pts = torch.randn(30, 2)
    plots.save_scatter(pts, tmp_path / "a.png", title="t")
    plots.save_scatter(pts, tmp_path / "b.png", labels=[0, 2] * 15, class_names=["cat", "x",
                                                                                "dog"])
    assert figures[0].axes[0].get_legend() is None and len(figures[0].axes[0].collections) == 1
    assert [t.get_text() for t in figures[1].axes[0].get_legend().get_texts()] == [
        "class cat", "class dog"]
    with pytest.raises(ValueError, match="3 labels for 30 points"):
        plots.save_scatter(pts, tmp_path / "c.png", labels=[0, 1, 2])
