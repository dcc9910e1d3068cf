"""The shipped recipes say what their table row or study claims.

Each recipe is resolved (``base:`` chain merged, registry defaults filled in) and its key settings
are compared with a table written here, independently of recipes/README.md; and the README must
mention every recipe file.
"""
from __future__ import annotations

import glob
import os
import re

import pytest

from mfrecipes import registry
from mfrecipes.plugins import load_components
from mfrecipes.recipe import load_recipe
from mfrecipes.build import check_recipe
from mfrecipes.recipe.schema import COMPONENT_SECTIONS

from conftest import REPO

RECIPES_DIR = os.path.join(REPO, "recipes")
EPOCH = 1_281_167

# -- expected settings -------------------------------------------------------------------------
# method (Kim et al. 2025, Table 3 columns): sampler, weighting, gap schedule (+ k)
MF = {"timestep_sampler.name": "logit_normal", "loss_weighting.name": "adaptive",
      "gap_schedule.name": "constant"}
MINSNR = {**MF, "loss_weighting.name": "min_snr", "loss_weighting.params.gamma": 5.0}
DTD = {**MF, "timestep_sampler.name": "dtd"}
BETA = {**MF, "gap_schedule.name": "progressive", "gap_schedule.params.k": 1.0}
MINSNR_BETA = {**MINSNR, "gap_schedule.name": "progressive", "gap_schedule.params.k": 1.0}
DTD_BETA = {**DTD, "gap_schedule.name": "progressive", "gap_schedule.params.k": 1.0}
IMAGENET_SAMPLER = {"timestep_sampler.params.mu": -0.4, "timestep_sampler.params.sigma": 1.0,
                    "timestep_sampler.params.fm_ratio": 0.75,
                    "loss_weighting.params.p": 1.0, "loss_weighting.params.c": 0.01}


def cfg(omega, kappa, t_end):
    return {"objective.params.omega": omega, "objective.params.kappa": kappa,
            "objective.params.t_start": 0.0, "objective.params.t_end": t_end,
            "objective.params.class_dropout": 0.1}


IMAGENET = {"data.name": "shards", "data.params.key": "latent.npy",
            "data.params.num_classes": 1000, "data.params.sample_shape": [4, 32, 32],
            "data.params.latent_scale": 0.18215, "train.global_batch_size": 256,
            "train.lr": 1e-4, "train.betas": [0.9, 0.95], "train.weight_decay": 0.0,
            "train.ema_decays": [0.9999], "engine": "deepspeed", "deepspeed.zero_stage": 2,
            "eval.nfe": [1, 2], **IMAGENET_SAMPLER}
EPOCHS_240 = {"train.total_images": 240 * EPOCH}


def model(name, omega, kappa, t_end):
    return {**IMAGENET, **EPOCHS_240, "backbone.name": name, "objective.name": "meanflow",
            **cfg(omega, kappa, t_end)}


B4 = model("dit_b_4", 1.0, 0.5, 1.0)
M2 = model("dit_m_2", 1.0, 0.5, 1.0)    # M/2 CFG unpublished: B settings (our reading)
L2 = model("dit_l_2", 0.2, 0.92, 0.8)
XL2 = model("dit_xl_2", 0.2, 0.92, 0.75)
L2_SMALL_CFG = {**L2, **cfg(1.0, 0.5, 1.0)}     # Table 2: the B/M settings on the large models
XL2_SMALL_CFG = {**XL2, **cfg(1.0, 0.5, 1.0)}
FFHQ_EPOCH = 70_000
FFHQ_B2 = {**{k: v for k, v in IMAGENET.items() if k != "data.params.num_classes"},
           "data.params.conditional": False, "backbone.name": "dit_b_2",
           "objective.name": "meanflow", "objective.params.omega": 1.0,
           "objective.params.kappa": 0.0, "objective.params.class_dropout": 0.0,
           "train.total_images": 400 * FFHQ_EPOCH}

DIGITS = {"data.name": "digits", "backbone.name": "dit_tiny_2", "objective.name": "meanflow",
          "objective.params.class_dropout": 0.1, "train.total_images": 150_000,
          "engine": "single"}

TABLE = {
    # the two headline recipes
    "imagenet256_xl_meanflow.yaml": {**XL2, **MF},
    "imagenet256_xl_ours.yaml": {**XL2, **DTD_BETA},
    # Table 1 (B/4 rows are the Table 3 recipes)
    "imagenet256/table1/m2_meanflow.yaml": {**M2, **MF},
    "imagenet256/table1/m2_ours.yaml": {**M2, **DTD_BETA},
    "imagenet256/table1/m2_ours_minsnr.yaml": {**M2, **MINSNR_BETA},
    "imagenet256/table1/l2_meanflow.yaml": {**L2, **MF},
    "imagenet256/table1/l2_ours.yaml": {**L2, **DTD_BETA},
    "imagenet256/table1/l2_ours_minsnr.yaml": {**L2, **MINSNR_BETA},
    "imagenet256/table1/xl2_meanflow.yaml": {**XL2, **MF},
    "imagenet256/table1/xl2_ours.yaml": {**XL2, **DTD_BETA},
    "imagenet256/table1/xl2_ours_minsnr.yaml": {**XL2, **MINSNR_BETA},
    # Table 2: L/2 and XL/2 trained with the small-model CFG (omega 1.0, kappa 0.5, no interval)
    "imagenet256/table2/l2_meanflow_small_cfg.yaml": {**L2_SMALL_CFG, **MF},
    "imagenet256/table2/l2_ours_small_cfg.yaml": {**L2_SMALL_CFG, **DTD_BETA},
    "imagenet256/table2/xl2_meanflow_small_cfg.yaml": {**XL2_SMALL_CFG, **MF},
    "imagenet256/table2/xl2_ours_small_cfg.yaml": {**XL2_SMALL_CFG, **DTD_BETA},
    # Table 6: FFHQ 256, unconditional, DiT-B/2, 400 epochs
    "ffhq256/table6/meanflow.yaml": {**FFHQ_B2, **MF},
    "ffhq256/table6/minsnr.yaml": {**FFHQ_B2, **MINSNR},
    "ffhq256/table6/dtd.yaml": {**FFHQ_B2, **DTD},
    "ffhq256/table6/beta.yaml": {**FFHQ_B2, **BETA},
    "ffhq256/table6/dtd_beta.yaml": {**FFHQ_B2, **DTD_BETA},
    # Table 3: the B/4 ablation
    "imagenet256/table3/meanflow.yaml": {**B4, **MF},
    "imagenet256/table3/minsnr.yaml": {**B4, **MINSNR},
    "imagenet256/table3/dtd.yaml": {**B4, **DTD},
    "imagenet256/table3/beta.yaml": {**B4, **BETA},
    "imagenet256/table3/minsnr_beta.yaml": {**B4, **MINSNR_BETA},
    "imagenet256/table3/dtd_beta.yaml": {**B4, **DTD_BETA},
    # Table 4: k of the progressive schedule, DTD + beta on B/4
    "imagenet256/table4/k05.yaml": {**B4, **DTD_BETA, "gap_schedule.params.k": 0.5},
    "imagenet256/table4/k1.yaml": {**B4, **DTD_BETA, "gap_schedule.params.k": 1.0},
    "imagenet256/table4/k2.yaml": {**B4, **DTD_BETA, "gap_schedule.params.k": 2.0},
    "imagenet256/table4/k3.yaml": {**B4, **DTD_BETA, "gap_schedule.params.k": 3.0},
    # other objectives on B/4
    "imagenet256/b4_flow_matching.yaml": {
        **IMAGENET, "backbone.name": "dit_b_4", "objective.name": "flow_matching",
        "objective.params.class_dropout": 0.1, "timestep_sampler.params.fm_ratio": 1.0},
    "imagenet256/b4_alphaflow.yaml": {
        **IMAGENET, "backbone.name": "dit_b_4", "objective.name": "alphaflow",
        **cfg(1.0, 0.5, 1.0), "objective.params.alpha_start": 0.0,
        "objective.params.alpha_end": 1.0, "objective.params.gamma": 25.0,
        "objective.params.target_clamp": 4.0, "timestep_sampler.params.fm_ratio": 0.25},
    # control variate (Lu & Wang 2026): B/4 sweep at 300k steps
    **{f"cv/imagenet256_b4_beta{n}.yaml": {
        **IMAGENET, "backbone.name": "dit_b_4", **cfg(1.0, 0.5, 1.0), **MF,
        "train.total_images": 300_000 * 256, "objective.params.beta_cv": b,
        "objective.params.beta_cv_source": "ema", "objective.params.fm_anchor_weight": 0.0}
       for n, b in (("0", 0.0), ("025", 0.25), ("05", 0.5))},
    "cv/imagenet256_b4_beta1.yaml": {
        **IMAGENET, "backbone.name": "dit_b_4", **cfg(1.0, 0.5, 1.0),
        "train.total_images": 300_000 * 256, "objective.params.beta_cv": 1.0,
        "loss_weighting.name": "adaptive", "loss_weighting.params.p": 0.0,
        "objective.params.fm_anchor_weight": 0.1, "objective.params.fm_anchor_delta": 1e-3},
    # control variate: 2-D toys, 3-layer MLP with 128 units, 200k steps
    **{f"cv/toy2d_{k}.yaml": {
        "data.name": "toy2d", "data.params.kind": k, "backbone.name": "mlp",
        "backbone.params.hidden": 128, "backbone.params.depth": 3,
        "objective.params.beta_cv": 0.0, "train.total_images": 200_000 * 256,
        "eval.num_samples": 4096}
       for k in ("checkerboard", "eight_gaussians", "two_moons", "swiss_roll", "two_spirals",
                 "pinwheel")},
    "cv/toy2d_beta1_anchor.yaml": {
        "data.params.kind": "swiss_roll", "backbone.name": "mlp", "objective.params.beta_cv": 1.0,
        "loss_weighting.params.p": 0.0, "objective.params.fm_anchor_weight": 0.1,
        "objective.params.fm_anchor_delta": 1e-3},
    # digits counterparts
    "digits/table3/meanflow.yaml": {**DIGITS, **MF},
    "digits/table3/minsnr.yaml": {**DIGITS, **MINSNR},
    "digits/table3/dtd.yaml": {**DIGITS, **DTD},
    "digits/table3/beta.yaml": {**DIGITS, **BETA},
    "digits/table3/minsnr_beta.yaml": {**DIGITS, **MINSNR_BETA},
    "digits/table3/dtd_beta.yaml": {**DIGITS, **DTD_BETA},
    "digits/table4/k05.yaml": {**DIGITS, **DTD_BETA, "gap_schedule.params.k": 0.5},
    "digits/table4/k1.yaml": {**DIGITS, **DTD_BETA, "gap_schedule.params.k": 1.0},
    "digits/table4/k2.yaml": {**DIGITS, **DTD_BETA, "gap_schedule.params.k": 2.0},
    "digits/table4/k3.yaml": {**DIGITS, **DTD_BETA, "gap_schedule.params.k": 3.0},
    **{f"digits/fig3/vnoise_k{n}.yaml": {**DIGITS, **MF, "objective.params.v_noise": k}
       for n, k in (("0", 0.0), ("001", 0.01), ("003", 0.03), ("01", 0.1))},
    **{f"digits/fig4/scratch_gap_{n}.yaml": {
        **DIGITS, **MF, "train.total_images": 100_000, "timestep_sampler.params.gap_range": g,
        "timestep_sampler.params.fm_ratio": 0.0}     # appendix A: no r = t sample
       for n, g in (("01_03", [0.1, 0.3]), ("03_05", [0.3, 0.5]), ("05_07", [0.5, 0.7]),
                    ("07_09", [0.7, 0.9]))},
    "digits/fig2_vpre0.yaml": {**DIGITS, **MF, "train.total_images": 100_000},
    "digits/flow_matching.yaml": {"run.name": "digits_fm", "objective.name": "flow_matching",
                                  "timestep_sampler.params.fm_ratio": 1.0},
    "digits/alphaflow.yaml": {"objective.name": "alphaflow", "backbone.name": "dit_tiny_2",
                              "timestep_sampler.params.fm_ratio": 0.25},
    # multi-stage and warm-started studies
    **{f"observation/digits_fig2_vpre{n}k.yaml": {
        **DIGITS, **MF, "train.total_images": n * 1000 + 100_000,
        "stages": [{"name": "v_pretrain", "images": n * 1000,
                    "overrides": {"timestep_sampler.params.fm_ratio": 1.0}},
                   {"name": "u_finetune", "images": 100_000, "overrides": {}}]}
       for n in (25, 50, 100)},
    **{f"observation/digits_fig4_vpre_gap_{n}.yaml": {
        **DIGITS, **MF, "timestep_sampler.params.gap_range": g,
        "stages": [{"name": "v_pretrain", "images": 50_000,
                    "overrides": {"timestep_sampler.params.fm_ratio": 1.0}},
                   {"name": "u_finetune", "images": 100_000,
                    "overrides": {"timestep_sampler.params.fm_ratio": 0.0}}]}
       for n, g in (("01_03", [0.1, 0.3]), ("03_05", [0.3, 0.5]), ("05_07", [0.5, 0.7]),
                    ("07_09", [0.7, 0.9]))},
    "observation/digits_dmf.yaml": {
        "objective.name": "discrete_meanflow", "objective.params.K": 6, "objective.params.q": 2.0,
        "objective.params.dagger": False, "objective.params.stage": None,
        "init_from.path": "runs/digits_fm", "init_from.weights": "ema",
        "train.total_images": 180_000},
    "observation/digits_dmf_dagger.yaml": {
        "objective.name": "discrete_meanflow", "objective.params.dagger": True,
        "init_from.path": "runs/digits_fm"},
    "observation/imagenet256_b4_dmf.yaml": {
        **IMAGENET, "backbone.name": "dit_b_4", "objective.name": "discrete_meanflow",
        "objective.params.K": 6, "objective.params.dagger": True, "objective.params.omega": 1.0,
        "objective.params.kappa": 0.0, "init_from.path": "runs/imagenet256_b4_fm",
        "train.total_images": 48 * EPOCH},
}


# -- helpers -----------------------------------------------------------------------------------
def all_recipes() -> list[str]:
    paths = glob.glob(os.path.join(RECIPES_DIR, "**", "*.yaml"), recursive=True)
    return sorted(os.path.relpath(p, RECIPES_DIR) for p in paths if "/_base/" not in p)


def resolved(data: dict, dotted: str):
    """The value at ``dotted`` in the resolved recipe; a component param the recipe leaves out
    is the registry default (what the run would use)."""
    parts = dotted.split(".")
    node = data
    for i, key in enumerate(parts):
        if isinstance(node, dict) and key in node:
            node = node[key]
            continue
        if i == 2 and parts[0] in COMPONENT_SECTIONS and parts[1] == "params":
            reg = registry.ALL_REGISTRIES[COMPONENT_SECTIONS[parts[0]]]
            return reg.entry(data[parts[0]]["name"]).parameters()[key]
        raise KeyError(dotted)
    return node


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(float(a) - float(b)) <= 1e-12 * max(
            1.0, abs(float(b)))
    return a == b


# -- tests -------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _builtins():
    load_components()


@pytest.mark.parametrize("rel", sorted(TABLE))
def test_recipe_resolves_to_its_row(rel):
    _, data = load_recipe(os.path.join(RECIPES_DIR, rel))
    wrong = {k: (resolved(data, k), v) for k, v in TABLE[rel].items()
             if not same(resolved(data, k), v)}
    assert not wrong, f"{rel}: key -> (resolved, expected): {wrong}"


def test_every_table_and_study_recipe_has_a_row():
    missing = [p for p in all_recipes() if p not in TABLE and p.split("/")[0] in
               ("imagenet256", "ffhq256", "cv", "digits", "observation")]
    assert not missing, f"recipes without expected settings in this test: {missing}"
    gone = [p for p in TABLE if p not in all_recipes()]
    assert not gone, f"rows whose recipe file does not exist: {gone}"


def test_readme_mentions_every_recipe():
    with open(os.path.join(RECIPES_DIR, "README.md"), encoding="utf-8") as f:
        text = f.read()
    missing = [p for p in all_recipes() if p not in text]
    assert not missing, f"recipes/README.md does not mention: {missing}"


def test_table_rows_differ_only_where_the_table_says():
    """Table 3 rows share everything but the sampler, weighting and gap schedule."""
    _, base = load_recipe(os.path.join(RECIPES_DIR, "imagenet256/table3/meanflow.yaml"))
    for rel in ("minsnr", "dtd", "beta", "minsnr_beta", "dtd_beta"):
        _, data = load_recipe(os.path.join(RECIPES_DIR, f"imagenet256/table3/{rel}.yaml"))
        differ = {k for k in data if data[k] != base[k]}
        assert differ <= {"run", "timestep_sampler", "loss_weighting", "gap_schedule"}, (rel,
                                                                                         differ)


WARM_STARTED = [p for p in sorted(TABLE) if "init_from.path" in TABLE[p]]


@pytest.mark.parametrize("rel", WARM_STARTED)
def test_warm_started_recipes_check_once_their_checkpoint_exists(rel, tmp_path, monkeypatch):
    """``init_from`` names a run directory that another recipe writes; with a stand-in weights
    file there, the rest of the recipe passes ``mfr check``."""
    recipe, _ = load_recipe(os.path.join(RECIPES_DIR, rel))
    weights = tmp_path / recipe.init_from.path / "weights.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    check_recipe(recipe)


@pytest.mark.parametrize("rel", [p for p in sorted(TABLE) if p not in WARM_STARTED])
def test_every_recipe_passes_mfr_check(rel):
    """What ``mfr check`` does: every component built from the recipe without data or GPU."""
    recipe, _ = load_recipe(os.path.join(RECIPES_DIR, rel))
    check_recipe(recipe)


# The paper's FID-50K (1-NFE, 2-NFE) as its text prints them (Kim et al. 2025, Tables 1, 2, 6).
PAPER_FID = {
    "imagenet256/table1/m2_meanflow.yaml": "5.01 / 4.61",
    "imagenet256/table1/m2_ours_minsnr.yaml": "4.61 / 4.30",
    "imagenet256/table1/m2_ours.yaml": "4.43 / 4.10",
    "imagenet256/table1/l2_meanflow.yaml": "3.84 / 3.35",
    "imagenet256/table1/l2_ours_minsnr.yaml": "3.79 / 3.31",
    "imagenet256/table1/l2_ours.yaml": "3.47 / 3.24",
    "imagenet256/table1/xl2_meanflow.yaml": "3.43 / 2.93",
    "imagenet256/table1/xl2_ours.yaml": "2.87 / 2.64",
    "imagenet256/table2/l2_meanflow_small_cfg.yaml": "4.60 / 4.58",
    "imagenet256/table2/l2_ours_small_cfg.yaml": "4.08 / 3.97",
    "imagenet256/table2/xl2_meanflow_small_cfg.yaml": "4.72 / 4.64",
    "imagenet256/table2/xl2_ours_small_cfg.yaml": "4.31 / 4.29",
    "ffhq256/table6/meanflow.yaml": "12.90 / 9.81",
    "ffhq256/table6/minsnr.yaml": "12.82 / 9.65",
    "ffhq256/table6/dtd.yaml": "12.41 / 9.61",
    "ffhq256/table6/beta.yaml": "12.24 / 9.52",
    "ffhq256/table6/dtd_beta.yaml": "11.33 / 9.19",
}


@pytest.mark.parametrize("rel", sorted(PAPER_FID))
def test_readme_row_carries_the_papers_numbers(rel):
    with open(os.path.join(RECIPES_DIR, "README.md"), encoding="utf-8") as f:
        rows = [line for line in f if line.startswith("|") and f"`{rel}`" in line]
    assert rows, f"recipes/README.md has no table row for {rel}"
    assert any(PAPER_FID[rel] in r and "not in our sources" not in r for r in rows), rows


def test_no_recipe_text_claims_a_figure_is_missing_from_the_sources():
    """The papers' full texts are available: a recipe or its README names the figure the paper
    prints, or says that no paper published one, never "not in our sources"."""
    hits = []
    for root, _, files in os.walk(RECIPES_DIR):
        for name in files:
            if name.endswith((".yaml", ".md")):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    if "not in our sources" in f.read():
                        hits.append(os.path.relpath(os.path.join(root, name), RECIPES_DIR))
    assert not hits, hits



def test_discrete_meanflow_figures_are_the_ones_its_summary_prints():
    """The DMF paper's summary prints one CIFAR-10 figure, 3.36 for the DMF curriculum from a
    pretrained flow model; it names DMF-dagger for ImageNet without a number. The README rows
    and the recipes' comments say so and present no other figure as reported."""
    with open(os.path.join(RECIPES_DIR, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    rows = {rel: [line for line in readme.splitlines()
                  if line.startswith("|") and f"`{rel}`" in line]
            for rel in ("cifar10/dmf.yaml", "cifar10/dmf_dagger.yaml")}
    assert len(rows["cifar10/dmf.yaml"]) == 1 and "| 3.36 (" in rows["cifar10/dmf.yaml"][0]
    (dagger,) = rows["cifar10/dmf_dagger.yaml"]
    assert "gives no CIFAR-10 figure for DMF-dagger" in dagger
    assert not re.search(r"\b\d+\.\d\d\b", dagger.split("|")[3]), dagger
    others = [os.path.join(RECIPES_DIR, "README.md"), os.path.join(RECIPES_DIR, "cifar10"),
              os.path.join(REPO, "datasets", "cifar10.md"),
              os.path.join(REPO, "mfrecipes", "METHOD.md")]
    texts = []
    for path in others:
        files = ([os.path.join(path, n) for n in os.listdir(path) if n.endswith(".yaml")]
                 if os.path.isdir(path) else [path])
        for name in files:
            with open(name, encoding="utf-8") as f:
                texts.append((name, f.read()))
    for name, text in texts:
        # the figures that circulated for DMF-dagger / MeanFlow-from-scratch / SiT-XL are
        # nowhere in the summary
        for figure in ("3.58", "3.85", "14.53"):
            assert figure not in text, (name, figure)
    dagger_yaml = dict(texts)[os.path.join(RECIPES_DIR, "cifar10", "dmf_dagger.yaml")]
    assert "gives no CIFAR-10 figure for" in dagger_yaml
