"""Fuzzing `mfr check` against `mfr run`: mutated shipped recipes get a clear error or train.

Each case is a shipped recipe cut down to a tiny run (small overrides), plus one to three random
mutations of its keys: wrong types, huge, negative, zero, NaN and infinite numbers, empty lists,
unknown component names and keys, non-dividing micro batches. For each case:

- ``mfr check`` either accepts it or raises one ``MfrError`` (a clear message): any other
  exception is a traceback, and a check running past its alarm is a hang;
- every case it accepts trains two steps (the image budget is cut to two global batches when the
  mutation asked for more) without any exception: a failure there is something `mfr check`
  should have caught.

The seed is fixed, so a failing case is reproducible from its printed overrides. A larger run is
the ``slow`` test; ``python tests/test_fuzz_recipes.py [N]`` prints the tallies.
"""
from __future__ import annotations

import os
import random
import sys
import traceback
from pathlib import Path

import pytest
from shared_parts import Hang, time_limit

ROOT = Path(__file__).resolve().parents[1]

# Tiny versions of the shipped recipes: the mutations apply on top of these.
BASES = {
    "toy2d_meanflow": (ROOT / "recipes" / "toy2d_meanflow.yaml", [
        "data.params.num_points=512", "backbone.params.hidden=16", "backbone.params.depth=2",
        "train.global_batch_size=16", "train.total_images=32", "train.log_every_images=16",
        "train.checkpoint_every_images=32", "train.progress_bar=false", "eval.every_images=null",
        "eval.at_end=false", "eval.num_samples=64", "eval.grid_size=16"]),
    "quickstart": (ROOT / "recipes" / "quickstart.yaml", [
        "run.device=cpu", "train.global_batch_size=8",
        "train.total_images=16", "train.log_every_images=8", "train.checkpoint_every_images=16",
        "train.progress_bar=false", "eval.every_images=null", "eval.at_end=false",
        "eval.num_samples=16", "eval.grid_size=4"]),
}

VALUES = ["abc", "[]", "{}", "true", "null", "1e30", "-1e30", "1000000000000000000000000000000",
          "1e18", "-1", "0", "-0.5", ".nan", ".inf", "-.inf", "1e-30", "0.5", "3", "7",
          "[1, 2]", "[.nan]", "[.inf, 0.9]", "[0]", "2.5"]
OTHER_NAMES = {
    "objective": ["flow_matching", "meanflow", "nope"],
    "timestep_sampler": ["uniform", "logit_normal", "dtd", "nope"],
    "loss_weighting": ["constant", "adaptive", "min_snr", "nope"],
    "gap_schedule": ["constant", "progressive", "nope"],
    "backbone": ["mlp", "dit_tiny_2", "nope"],
    "data": ["toy2d", "digits", "nope"],
}
# Keys of the components' params that the base recipes leave at their defaults.
EXTRA_KEYS = ["timestep_sampler.params.mu", "timestep_sampler.params.sigma",
              "timestep_sampler.params.mu_r", "timestep_sampler.params.sigma_r",
              "timestep_sampler.params.fm_ratio", "loss_weighting.params.p",
              "loss_weighting.params.c", "objective.params.class_dropout", "train.grad_clip",
              "train.weight_decay", "train.micro_batch_size", "train.max_nonfinite",
              "train.keep_checkpoints", "train.betas", "eval.nfe", "eval.seed", "run.seed",
              "backbone.params.bogus", "train.bogus", "deepspeed.zero_stage"]


def _leaves(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += _leaves(v, path + ".")
        else:
            out.append(path)
    return out


def _get(d: dict, path: str):
    for p in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _near(value, rng: random.Random) -> str:
    """A value of the same type as ``value`` but at an edge: the careless user's typo."""
    if isinstance(value, bool):
        return rng.choice(["true", "false", "1", "yes"])
    if isinstance(value, (int, float)):
        return rng.choice(["1e30", "1000000000000000000000000000000", "1e18", "-1", "0",
                           ".nan", ".inf", "-.inf", "1e-30", repr(value * 1000),
                           repr(-value), repr(value / 1000), "4294967296", "2.5"])
    if isinstance(value, list):
        return rng.choice(["[]", "[.nan]", "[.inf]", "[0]", "[1e30]", "[-1]",
                           str([*value, *value])])
    if isinstance(value, str):
        return rng.choice(["nope", "''", "CPU"])
    return rng.choice(VALUES)


def make_cases(n: int, seed: int = 14) -> list[tuple[str, list[str]]]:
    """``n`` (base name, override list) pairs; the same for the same ``n`` and ``seed``."""
    from mfrecipes.recipe import load_recipe

    rng = random.Random(seed)
    keys, resolved = {}, {}
    for name, (path, base) in BASES.items():
        _, data = load_recipe(str(path), base)
        resolved[name] = data
        keys[name] = sorted(set(_leaves(data)) - {"imports", "stages", "init_from"}) + EXTRA_KEYS
    cases = []
    for _ in range(n):
        name = rng.choice(sorted(BASES))
        muts = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            roll = rng.random()
            if roll < 0.12:
                section = rng.choice(sorted(OTHER_NAMES))
                muts.append(f"{section}.name={rng.choice(OTHER_NAMES[section])}")
            elif roll < 0.2:
                muts.append(f"train.micro_batch_size={rng.randint(1, 20)}")
            else:
                key = rng.choice(keys[name])
                value = _get(resolved[name], key)
                text = _near(value, rng) if value is not None and rng.random() < 0.7 else \
                    rng.choice(VALUES)
                muts.append(f"{key}={text}")
        cases.append((name, muts))
    return cases




def run_case(name: str, muts: list[str], tmp: Path, *, check_s: float = 20,
             train_s: float = 60) -> tuple[str, str]:
    """``(outcome, detail)``; outcome: accepted_trained, clear_error, traceback, hang, or
    train_failed (check accepted a recipe that does not train two steps)."""
    import warnings

    from mfrecipes.errors import MfrError
    from mfrecipes.recipe import load_recipe
    from mfrecipes.build import check_recipe
    from mfrecipes.train.loop import train

    path, base = BASES[name]
    overrides = base + [f"run.cache_dir={tmp / 'cache'}"] + muts
    try:
        with time_limit(check_s), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recipe, _ = load_recipe(str(path), overrides)
            check_recipe(recipe)
    except MfrError as err:
        return "clear_error", str(err).splitlines()[0]
    except Hang as err:
        return "hang", f"check: {err}"
    except Exception:  # noqa: BLE001 (the point: anything else is a traceback)
        return "traceback", "check: " + traceback.format_exc(limit=-3)
    # Two steps: cut the budget to two global batches (the mutation may have asked for more).
    two = 2 * recipe.train.global_batch_size
    if recipe.train.total_images > two:
        overrides = overrides + [f"train.total_images={two}"]
    run_dir = tmp / f"run{len(os.listdir(tmp))}"
    try:
        with time_limit(train_s), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recipe, data = load_recipe(str(path), overrides)
            out = train(recipe, data, str(run_dir))
    except Hang as err:
        return "hang", f"train: {err}"
    except Exception as err:  # noqa: BLE001
        return "train_failed", f"train: {type(err).__name__}: {err}\n" + \
            traceback.format_exc(limit=-3)
    if out.get("step") != 2:
        return "train_failed", f"trained {out.get('step')} steps, not 2"
    return "accepted_trained", ""


def tally(cases, tmp: Path) -> tuple[dict, list]:
    counts = dict.fromkeys(("accepted_trained", "clear_error", "traceback", "hang",
                            "train_failed"), 0)
    bad = []
    for name, muts in cases:
        outcome, detail = run_case(name, muts, tmp)
        counts[outcome] += 1
        if outcome not in ("accepted_trained", "clear_error"):
            bad.append((name, muts, outcome, detail))
    return counts, bad


def _assert_clean(counts, bad):
    report = "\n".join(f"{n} {' '.join(m)} -> {o}: {d}" for n, m, o, d in bad)
    assert not bad, f"{counts}\n{report}"
    assert counts["accepted_trained"] > 0 and counts["clear_error"] > 0, counts


def test_fuzzed_recipes_fail_clearly_or_train(tmp_path, monkeypatch):
    monkeypatch.setenv("MFR_CACHE_DIR", str(tmp_path / "cache"))
    counts, bad = tally(make_cases(30), tmp_path)
    _assert_clean(counts, bad)


@pytest.mark.slow
def test_fuzzed_recipes_many(tmp_path, monkeypatch):
    monkeypatch.setenv("MFR_CACHE_DIR", str(tmp_path / "cache"))
    counts, bad = tally(make_cases(600, seed=2026), tmp_path)
    _assert_clean(counts, bad)


if __name__ == "__main__":
    import tempfile

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 14
    with tempfile.TemporaryDirectory() as d:
        os.environ["MFR_CACHE_DIR"] = os.path.join(d, "cache")
        counts, bad = tally(make_cases(n, seed), Path(d))
    for name, muts, outcome, detail in bad:
        print(f"--- {name} {' '.join(muts)} -> {outcome}\n{detail}")
    print(f"tried {n}: {counts}")
