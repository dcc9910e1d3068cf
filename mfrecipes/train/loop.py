"""The training loop, top to bottom:

batch -> (t, r) -> objective -> weights -> backward -> step -> EMA -> log / checkpoint / evaluate.

Progress is counted in images seen; ``progress`` in [0, 1] is what the components see: images /
total images, or, in a multi-stage recipe, the fraction of the current stage's images.
Everything random comes from two places whose states are checkpointed: a CPU ``torch.Generator``
for (t, r) and noise, and torch's global RNG (class dropout inside objectives), so a resumed run
reproduces an uninterrupted one bit for bit on the CPU.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

import torch

from mfrecipes.errors import CheckpointError, RecipeError, TrainingError
from mfrecipes.recipe import build as rbuild
from mfrecipes.recipe.schema import Recipe
from mfrecipes.train import checkpoint as ckpt
from mfrecipes.train.ema import EMA
from mfrecipes.train.log import RunLogger, truncate_metrics
from mfrecipes.train.rundir import write_run_records


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecipeError("run.device is 'cuda' but no CUDA device is available; use 'auto' or "
                          "'cpu'", path="run.device")
    return torch.device(name)


def _crossed(before: int, after: int, every: int | None) -> bool:
    return bool(every) and before // every != after // every


class Trainer:
    """Holds the parts of one run; ``run()`` is the loop."""

    def __init__(self, recipe: Recipe, resolved: dict, run_dir: str):
        self.recipe, self.resolved, self.run_dir = recipe, resolved, run_dir
        cfg = recipe.train
        self.device = pick_device(recipe.run.device)
        torch.manual_seed(recipe.run.seed)
        rbuild.load_imports(recipe)

        if recipe.engine == "deepspeed":
            from mfrecipes.train.deepspeed_engine import DeepSpeedEngine  # only it imports deepspeed
            engine_cls = DeepSpeedEngine
            rank, world = DeepSpeedEngine.rank_and_world()
        else:
            engine_cls, rank, world = None, 0, 1
        self.dataset = rbuild.build_dataset(recipe, rank=rank, world_size=world)
        self.info = self.dataset.info
        net = rbuild.build_backbone(recipe, self.info).to(self.device)
        if engine_cls is None:
            from mfrecipes.train.engine import SingleEngine
            self.engine = SingleEngine(net, cfg, self.device)
        else:
            self.engine = engine_cls(net, recipe, self.device)
        self.net = self.engine.module  # the raw module: the JVP cannot run through wrappers
        self.ema = EMA(self.net, cfg.ema_decays)
        self.generator = torch.Generator().manual_seed(recipe.run.seed * 1_000_003 + 7 + rank)
        self.images = 0       # global images seen
        self.step = 0
        self.nonfinite = 0
        self.data_position = 0  # samples this rank has consumed
        self.plan = rbuild.stage_plan(recipe)
        self.stage_idx = -1
        self._enter_stage(0)

    # -- stages ---------------------------------------------------------------------------------
    def _stage_at(self, images: int) -> int:
        for i, st in enumerate(self.plan):
            if images < st.end:
                return i
        return len(self.plan) - 1

    def _enter_stage(self, idx: int) -> None:
        """Build the stage's light components and apply its optimiser settings.

        Weights, optimiser moments and EMAs carry over; samplers, weightings, schedules and the
        objective start afresh, and ``progress`` counts within the stage.
        """
        st = self.plan[idx]
        parts = rbuild.build_light(st.recipe, num_classes=self.info.num_classes,
                                   device=self.device)
        self.objective = parts["objective"]
        self.sampler = parts["timestep_sampler"]
        self.loss_weighting = parts["loss_weighting"]
        self.gap_schedule = parts["gap_schedule"]
        self.engine.configure(st.recipe.train)
        self.stage_idx = idx
        self.stage = st

    def progress(self) -> float:
        st = self.stage
        return min(max((self.images - st.start) / (st.end - st.start), 0.0), 1.0)

    def init_weights(self) -> str:
        """Load ``init_from`` weights into the network and every EMA."""
        init = self.recipe.init_from
        path = rbuild.find_init_weights(init.path)
        groups = ckpt.load_weights(path)
        key = "net" if init.weights == "raw" else (init.ema or next(
            (k for k in groups if k.startswith("ema_")), None))
        if key not in groups:
            raise CheckpointError(f"{path} has no weights {key!r}; it holds "
                                  f"{', '.join(sorted(groups))}", path="init_from")
        try:
            self.net.load_state_dict(groups[key])
        except RuntimeError as err:
            raise CheckpointError(f"init_from weights {path} ({key}) do not fit this recipe's "
                                  f"backbone: {err}", path="init_from") from err
        self.ema.load_state_dicts({k: groups[key] for k in self.ema.shadows})
        return f"{path} ({key})"

    # -- state ----------------------------------------------------------------------------------
    def train_state(self) -> dict[str, Any]:
        state = {
            "images": self.images, "step": self.step, "nonfinite": self.nonfinite,
            "stage": self.stage_idx,
            "data_position": self.data_position,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "engine": self.engine.state_dict(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        for name in ("sampler", "loss_weighting", "gap_schedule", "objective"):
            comp = getattr(self, name)
            if hasattr(comp, "state_dict"):
                state[f"{name}_state"] = comp.state_dict()
        return state

    def save(self) -> str | None:
        if not self.engine.is_main:
            return None
        weights = {"net": self.net.state_dict(), **self.ema.state_dicts()}
        meta = {"recipe": self.recipe.run.name, "ema": list(self.ema.shadows),
                "sample_shape": list(self.info.sample_shape),
                "num_classes": self.info.num_classes}
        return ckpt.save_checkpoint(os.path.join(self.run_dir, "checkpoints"), images=self.images,
                                    step=self.step, weights=weights,
                                    train_state=self.train_state(), meta=meta,
                                    keep=self.recipe.train.keep_checkpoints)

    def resume(self) -> bool:
        folder = ckpt.latest_checkpoint(os.path.join(self.run_dir, "checkpoints"))
        if folder is None:
            return False
        ckpt.load_meta(folder)
        weights = ckpt.load_weights(folder)
        state = ckpt.load_train_state(folder)
        try:
            self.net.load_state_dict(weights["net"])
            self.ema.load_state_dicts({k: v for k, v in weights.items() if k != "net"})
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {folder} does not match this recipe's backbone: "
                                  f"{err}") from err
        self.engine.load_state_dict(state["engine"])
        self.images, self.step = state["images"], state["step"]
        # Component states belong to the stage that was running when the checkpoint was written.
        self._enter_stage(state.get("stage", 0))
        self.nonfinite, self.data_position = state["nonfinite"], state["data_position"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        for name in ("sampler", "loss_weighting", "gap_schedule", "objective"):
            comp = getattr(self, name)
            if f"{name}_state" in state and hasattr(comp, "load_state_dict"):
                comp.load_state_dict(state[f"{name}_state"])
        return True

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, logger: RunLogger) -> dict[str, float]:
        from mfrecipes import evaluate, generate, plots

        ev = self.recipe.eval
        net = self.ema.module()
        out_dir = os.path.join(self.run_dir, "samples")
        os.makedirs(out_dir, exist_ok=True)
        record: dict[str, float] = {}
        for nfe in ev.nfe:
            n = max(ev.num_samples, ev.grid_size)
            x, _ = generate.generate(net, self.info, n, nfe=nfe, seed=ev.seed, device=self.device,
                                     labels="balanced")
            x = x.float().cpu()
            stem = os.path.join(out_dir, f"nfe{nfe}-img{self.images:012d}.png")
            if self.info.modality == "points":
                plots.save_scatter(x, stem, reference=self.dataset.reference(n, ev.seed),
                                   title=f"{self.recipe.run.name}: {nfe}-NFE, "
                                         f"{self.images} images")
            elif self.info.modality == "image":
                plots.save_image_grid(x[:ev.grid_size], stem)
            quality = evaluate.quality(self.dataset, x[:ev.num_samples],
                                       cache_dir=rbuild.default_cache_dir(self.recipe),
                                       seed=ev.seed)
            for k, v in quality.items():
                record[f"eval/nfe{nfe}/{k}"] = float(v)
        logger.log({"images": self.images, "step": self.step, **record})
        return record

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, ev = self.recipe.train, self.recipe.eval
        is_main = self.engine.is_main
        if is_main:
            write_run_records(self.run_dir, self.resolved, world_size=self.engine.world_size,
                              device=str(self.device))
        resumed = self.resume()
        if resumed and is_main:
            truncate_metrics(self.run_dir, self.images)
        init_note = None
        if not resumed and self.recipe.init_from is not None:
            init_note = self.init_weights()
        logger = RunLogger(self.run_dir, cfg.total_images, self.images, enabled=is_main,
                           progress_bar=cfg.progress_bar)
        if init_note:
            logger.info(f"initialised from {init_note}")
        if resumed:
            logger.info(f"resumed from {self.images} images (step {self.step})")
        else:
            logger.info(f"training {self.recipe.run.name}: {self.info.name} -> "
                        f"{type(self.net).__name__} "
                        f"({sum(p.numel() for p in self.net.parameters()) / 1e6:.2f}M params), "
                        f"{cfg.total_images} images on {self.device}")
            for name in ("sampler", "loss_weighting", "gap_schedule"):
                comp = getattr(self, name)
                if hasattr(comp, "describe"):
                    logger.log({"images": 0, "step": 0, **{f"{name}/{k}": v for k, v in
                                                          comp.describe().items()}}, echo=False)

        mb = self.engine.micro_batch_size()
        accum = self.engine.accumulation_steps()
        batches = self.dataset.batches(mb, start=self.data_position)
        window = {"loss": 0.0, "n": 0, "t0": time.time(), "images0": self.images}
        result: dict[str, Any] = {}
        try:
            while self.images < cfg.total_images:
                if self._stage_at(self.images) != self.stage_idx:
                    self._enter_stage(self._stage_at(self.images))
                    logger.log({"images": self.images, "step": self.step,
                                "stage": self.stage.name}, echo=False)
                    logger.info(f"stage {self.stage.name}: images {self.stage.start}-"
                                f"{self.stage.end}")
                loss_value, diag, grad_norm = self._train_step(batches, mb, accum)
                before = self.images
                self.images += cfg.global_batch_size
                self.step += 1
                logger.advance(self.images, f"loss {loss_value:.4g}")
                if math.isfinite(loss_value):
                    window["loss"] += loss_value
                    window["n"] += 1
                if _crossed(before, self.images, cfg.log_every_images) or \
                        self.images >= cfg.total_images:
                    dt = max(time.time() - window["t0"], 1e-9)
                    logger.log({"images": self.images, "step": self.step,
                                "loss": window["loss"] / max(window["n"], 1),
                                "grad_norm": grad_norm, "lr": cfg.lr,
                                "img_per_s": (self.images - window["images0"]) / dt,
                                "nonfinite": self.nonfinite,
                                **diag, **self.dataset.counters()})
                    window = {"loss": 0.0, "n": 0, "t0": time.time(), "images0": self.images}
                done = self.images >= cfg.total_images
                if _crossed(before, self.images, ev.every_images) and not done and is_main:
                    result.update(self.evaluate(logger))
                if _crossed(before, self.images, cfg.checkpoint_every_images) or done:
                    self.save()
            if ev.at_end and is_main:
                result.update(self.evaluate(logger))
        finally:
            logger.close()
        return {"images": self.images, "step": self.step, "nonfinite": self.nonfinite, **result}

    def _train_step(self, batches, mb: int, accum: int) -> tuple[float, dict, float]:
        progress = self.progress()
        total = 0.0
        diag: dict[str, float] = {}
        for _ in range(accum):
            x, y = next(batches)
            self.data_position += x.shape[0]
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device) if y is not None else None
            t, r = self.sampler.sample(x.shape[0], progress=progress, generator=self.generator,
                                       device=self.device)
            noise = torch.randn(x.shape, generator=self.generator).to(self.device)
            with self.engine.autocast():
                out = self.objective(self.net, x, y, t, r, noise, progress=progress,
                                     ema_net=self.ema.module())
            err = out.err.float()
            # Loss = mean(adaptive [* MinSNR alpha] * progressive beta * err) (Kim et al., Eqs. 8-9)
            w = self.loss_weighting.weights(err, t, r) * self.gap_schedule.weights(t, r, progress)
            loss = (w.detach() * err).mean() / accum
            self.engine.backward(loss)
            total += float(loss.detach())
            for k, v in out.diagnostics.items():
                diag[f"obj/{k}"] = diag.get(f"obj/{k}", 0.0) + float(v) / accum
        grad_norm = self.engine.clip_and_check()
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            # Never step on (or save) a non-finite loss: drop the update and count it.
            self.engine.skip()
            self.nonfinite += 1
            if self.engine.is_main:
                print(f"warning: non-finite loss/gradient at {self.images} images "
                      f"({self.nonfinite}/{self.stage.recipe.train.max_nonfinite} allowed); "
                      f"update skipped", flush=True)
            if self.nonfinite > self.stage.recipe.train.max_nonfinite:
                raise TrainingError(
                    f"{self.nonfinite} non-finite losses by {self.images} images (limit "
                    f"train.max_nonfinite={self.stage.recipe.train.max_nonfinite}); the last good "
                    f"checkpoint in {self.run_dir}/checkpoints is intact. Lower train.lr, set "
                    f"train.grad_clip, or check the data")
            return total, diag, grad_norm
        self.engine.step()
        self.ema.update(self.net)
        if hasattr(self.sampler, "observe"):
            self.sampler.observe(total, progress)
        return total, diag, grad_norm


def train(recipe: Recipe, resolved: dict, run_dir: str) -> dict[str, Any]:
    return Trainer(recipe, resolved, run_dir).run()
