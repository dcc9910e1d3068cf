"""The training loop, top to bottom:

batch -> (t, r) -> objective -> weights -> backward -> step -> EMA -> log / checkpoint / evaluate.

Progress is counted in images seen; ``progress`` in [0, 1] is what the components see: images /
total images, or, in a multi-stage recipe, the fraction of the current stage's images.
Everything random comes from one CPU ``torch.Generator`` per purpose (``streams.py``: (t, r),
noise, the objective's own draws such as class dropout), seeded from the run seed and
checkpointed with torch's global RNG, so a resumed run reproduces an uninterrupted one bit for bit
on the CPU; evaluation runs inside ``torch.random.fork_rng`` and draws from none of them, so the
evaluation cadence does not change the trajectory.

With several ranks (``engine: deepspeed``), the (t, r) and noise streams are the same on every
rank: each step draws them for the whole global batch and rank k takes rows k::world_size, so
the draws do not depend on the world size. Each rank reads its own share of the data, the loss
is averaged across ranks before it is logged or fed back to a sampler, and every rank takes part
in a checkpoint; rank 0 alone logs, evaluates and writes the plain files.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any

import torch

from mfrecipes import contracts, registry
from mfrecipes.data.augment import LabelChannels
from mfrecipes.data.cache import default_cache_dir
from mfrecipes.devices import pick_device
from mfrecipes.errors import CheckpointError, RecipeError, TrainingError
from mfrecipes import build as rbuild
from mfrecipes.recipe.schema import Recipe
from mfrecipes.train import checkpoint as ckpt
from mfrecipes.train.compile import compile_backbone
from mfrecipes.train.ema import EMA
from mfrecipes.run import layout
from mfrecipes.run import records as rundir
from mfrecipes.run.records import write_run_records
from mfrecipes.train.log import RunLogger, truncate_metrics
from mfrecipes.train.streams import RandomStreams


def _crossed(before: int, after: int, every: int | None) -> bool:
    return bool(every) and before // every != after // every


class Trainer:
    """Holds the parts of one run; ``run()`` is the loop."""

    def __init__(self, recipe: Recipe, resolved: dict, run_dir: str, *,
                 init_missing_ema: bool = False):
        self.recipe, self.resolved, self.run_dir = recipe, resolved, run_dir
        # A resumed checkpoint without one of the recipe's EMAs: start it from the raw weights
        # (recorded in the history) instead of refusing.
        self.init_missing_ema = init_missing_ema
        self.resume_notes: list[str] = []
        cfg = recipe.train
        self.device = pick_device(recipe.run.device)
        torch.manual_seed(recipe.run.seed)
        rbuild.load_imports(recipe)

        if recipe.engine == "deepspeed":
            # The only module that imports deepspeed.
            from mfrecipes.train.deepspeed_engine import DeepSpeedEngine as Engine
        else:
            from mfrecipes.train.engine import SingleEngine as Engine
        self.rank, self.world, self.device = Engine.launch(self.device)
        self.dataset = rbuild.build_dataset(recipe, rank=self.rank, world_size=self.world)
        self.info = self.dataset.info
        net = rbuild.build_backbone(recipe, self.info).to(self.device)  # same seed: same init
        self.engine = Engine(net, recipe, self.device)
        self.net = self.engine.module  # the raw module: the JVP cannot run through wrappers
        self.ema = EMA(self.net, cfg.ema_decays)
        if cfg.compile:  # after the EMA copies: they stay eager
            compile_backbone(self.net, cfg.compile_mode)
        if self.rank:  # anything left on the global RNG (dropout layers) differs between ranks
            torch.manual_seed(recipe.run.seed + 7919 * self.rank)
        # (t, r) and noise are shared by all ranks, drawn for the global batch (see _train_step);
        # the objective's stream is per rank.
        self.streams = RandomStreams(recipe.run.seed, rank=self.rank)
        self.images = 0       # global images seen
        self.step = 0
        self.nonfinite = 0
        self.watched_loss = math.nan  # the last step's unweighted r = t error (DTD's feedback)
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
        self.objective = parts.objective
        # The objective's own draws come from its stream; an objective (a plugin's) whose call
        # takes no ``generator`` keyword draws from the global RNG instead.
        self._objective_takes_generator = contracts.takes_generator(self.objective)
        self._enter_augment(st.recipe)
        self.sampler = parts.timestep_sampler
        self.loss_weighting = parts.loss_weighting
        self.gap_schedule = parts.gap_schedule
        # The stage's first step checks every component's outputs on the real batch (once).
        self._contracts_pending = {s: rbuild.component_of(st.recipe, s) for s in (
            "timestep_sampler", "loss_weighting", "gap_schedule", "objective", "backbone")}
        self.engine.configure(st.recipe.train)
        self.stage_idx = idx
        self.stage = st

    def _enter_augment(self, recipe: Recipe) -> None:
        """The stage's ``train.augment`` transform, or None; its labels reach the backbone's
        ``augment_labels`` through :class:`LabelChannels` (no objective needs to know)."""
        self.augment = None
        block = recipe.train.augment
        if block is None:
            return
        self.augment = registry.TRANSFORMS.build(block.as_dict(), where="train.augment")
        want = contracts.label_dim(self.augment)
        have = contracts.augment_dim(self.net)
        if len(self.info.sample_shape) != 3:
            raise RecipeError(f"train.augment {block.name!r} needs image data (C, H, W), got "
                              f"sample_shape {tuple(self.info.sample_shape)}",
                              path="train.augment")
        check_channels = getattr(self.augment, "check_channels", None)
        if check_channels is not None:
            try:
                check_channels(int(self.info.sample_shape[0]))
            except ValueError as err:
                raise RecipeError(f"train.augment {block.name!r}: {err}",
                                  path="train.augment.params") from err
        if have != want:
            raise RecipeError(
                f"train.augment {block.name!r} gives {want} conditioning labels but the backbone "
                f"{recipe.backbone.name!r} takes {have if have is not None else 'none'}; set "
                f"backbone.params.augment_dim: {want} (a backbone with augment_labels, e.g. unet)",
                path="backbone.params.augment_dim")
        if contracts.v_noise(self.objective):
            # the corruption is drawn over every channel, the label planes included
            raise RecipeError("train.augment cannot be combined with objective.params.v_noise "
                              "> 0; valid: v_noise: 0", path="objective.params.v_noise")
        self._aug_net = LabelChannels(self.net, self.info.sample_shape[0])

    def progress(self) -> float:
        st = self.stage
        return min(max((self.images - st.start) / (st.end - st.start), 0.0), 1.0)

    def init_weights(self) -> str:
        """Load ``init_from`` weights into the network and every EMA."""
        init = self.recipe.init_from
        path = layout.find_init_weights(init.path)
        groups = ckpt.load_weights(path)
        key = "net" if init.weights == "raw" else (init.ema or next(
            (k for k in groups if k.startswith("ema_")), None))
        if key not in groups:
            raise CheckpointError(f"{path} has no weights {key!r}; it holds "
                                  f"{', '.join(sorted(groups))}", path="init_from")
        try:
            self.engine.load_weights(groups[key])
        except RuntimeError as err:
            raise CheckpointError(f"init_from weights {path} ({key}) do not fit this recipe's "
                                  f"backbone: {err}", path="init_from") from err
        self.ema.load_state_dicts({k: groups[key] for k in self.ema.shadows})
        return f"{path} ({key})"

    # -- state ----------------------------------------------------------------------------------
    def rank_state(self) -> dict[str, Any]:
        """What differs between ranks: the data position and torch's RNG."""
        state = {"data_position": self.data_position, "torch_rng": torch.get_rng_state(),
                 "streams": self.streams.rank_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def train_state(self) -> dict[str, Any]:
        """Every rank calls this (the engine and the rank states are gathered)."""
        state = {
            "images": self.images, "step": self.step, "nonfinite": self.nonfinite,
            "stage": self.stage_idx,
            "streams": self.streams.shared_state(),
            "world_size": self.world,
            "ranks": self.engine.gather(self.rank_state()),
            "engine": self.engine.state_dict(),
        }
        for name in ("sampler", "loss_weighting", "gap_schedule", "objective"):
            comp_state = contracts.state_of(getattr(self, name))
            if comp_state is not None:
                state[f"{name}_state"] = comp_state
        return state

    def save(self) -> str | None:
        """Every rank takes part; rank 0 writes the plain files."""
        weights = {"net": self.engine.full_state_dict(), **self.ema.state_dicts()}
        bad = [f"{g}/{k}" for g, sd in weights.items() for k, v in sd.items()
               if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if self.engine.broadcast(bad):  # every rank stops alike
            raise TrainingError(f"not saving a checkpoint at {self.images} images: weights "
                                f"{', '.join(bad[:5])} are not finite; "
                                f"{self.last_good_checkpoint()}")
        state = self.train_state()
        meta = {"recipe": self.recipe.run.name, "ema": list(self.ema.shadows),
                "sample_shape": list(self.info.sample_shape),
                "num_classes": self.info.num_classes, "world_size": self.world}
        main = self.engine.is_main
        return ckpt.save_checkpoint(layout.checkpoints_dir(self.run_dir), images=self.images,
                                    step=self.step, weights=weights if main else None,
                                    train_state=state if main else None,
                                    meta=meta if main else None,
                                    keep=self.recipe.train.keep_checkpoints, engine=self.engine)

    def last_good_checkpoint(self) -> str:
        """A sentence naming the newest checkpoint that verifies, or saying there is none."""
        found = layout.newest_verified(self.run_dir)
        if found is not None:
            return f"the last good checkpoint is {found[0]} ({found[1]['images']} images)"
        return f"no good checkpoint exists in {layout.checkpoints_dir(self.run_dir)}"

    def _read_checkpoint(self, folder: str):
        """Verify and read one checkpoint completely, before anything is changed."""
        meta = layout.verify_checkpoint(folder)
        weights = ckpt.load_weights(folder)
        state = ckpt.load_train_state(folder)
        if state["images"] != meta["images"]:
            raise CheckpointError(f"inconsistent checkpoint {folder}: {ckpt.STATE} is at "
                                  f"{state['images']} images, {ckpt.META} at {meta['images']}")
        if "net" not in weights:
            raise CheckpointError(f"damaged checkpoint file {folder}/{ckpt.WEIGHTS}: no raw "
                                  f"weights (group 'net')")
        return weights, state

    def resume(self) -> bool:
        """Load the newest checkpoint that verifies; a damaged one is reported, set aside
        (``damaged-img-...``, never deleted), and the one before it is used."""
        root = layout.checkpoints_dir(self.run_dir)
        candidates = layout.checkpoints_newest_first(root) if self.engine.is_main else None
        found, problems = None, []
        if self.engine.is_main:
            for folder in candidates:
                try:
                    read = self._read_checkpoint(folder)
                except CheckpointError as err:
                    problems.append((folder, str(err)))
                    continue
                found = folder
                break
        found, problems = self.engine.broadcast((found, problems))
        if problems and found is None:
            raise CheckpointError(f"no checkpoint of {root} verifies ({problems[0][1]}; "
                                  f"{len(problems)} checked, all kept)")
        if found is None:
            return False
        # Every rank reads the same folder (the main rank has it already).
        weights, state = read if self.engine.is_main else self._read_checkpoint(found)
        missing = [k for k in self.ema.shadows if k not in weights]
        if missing and not self.init_missing_ema:
            raise CheckpointError(f"checkpoint {found} holds no EMA {', '.join(missing)} "
                                  f"(it holds {', '.join(sorted(weights))}); pass "
                                  f"--init-missing-ema to start it from the raw weights",
                                  path="train.ema_decays")
        try:
            self.engine.load_weights(weights["net"])
            self.ema.load_state_dicts({k: weights.get(k, weights["net"])
                                       for k in self.ema.shadows})
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {found} does not match this recipe's backbone: "
                                  f"{err}") from err
        for folder, why in problems:
            self.resume_notes.append(f"{why}; resuming from {os.path.basename(found)} instead")
            if self.engine.is_main:
                self.resume_notes.append(f"kept the damaged checkpoint as "
                                         f"{ckpt.set_aside(folder)}")
        if missing:
            self.resume_notes.append(f"EMA {', '.join(missing)} was not in the checkpoint: "
                                     f"initialised from the raw weights (--init-missing-ema)")
        self.resumed_from = found
        self.resume_note = self.engine.load_state_dict(state["engine"], found)
        self.images, self.step = state["images"], state["step"]
        # Component states belong to the stage that was running when the checkpoint was written.
        self._enter_stage(state.get("stage", 0))
        self.nonfinite = state["nonfinite"]
        ranks = state.get("ranks") or [state]  # older single-process layout
        if "streams" in state:
            self.streams.load_shared_state(state["streams"])
        else:  # a checkpoint from before one stream per purpose: one generator for (t, r), noise
            self.streams.timesteps.set_state(state["generator"])
            self.resume_note += ("; checkpoint from an older version (one generator for (t, r) "
                                 "and noise): noise and objective draws differ from an "
                                 "uninterrupted run")
        if len(ranks) == self.world:
            mine = ranks[self.rank]
            self.data_position = mine["data_position"]
            torch.set_rng_state(mine["torch_rng"])
            if "streams" in mine:
                self.streams.load_rank_state(mine["streams"])
            if "cuda_rng" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        else:
            # Another world size splits the shards differently: continue each rank's new stream
            # at the same fraction of an epoch, with fresh per-rank RNG.
            self.data_position = self.images // self.world
            torch.manual_seed(self.recipe.run.seed + 7919 * self.rank + self.step)
            self.streams.reseed_rank(self.step)
            self.resume_note += (f"; world size {len(ranks)} -> {self.world}: data order and "
                                 f"per-rank randomness differ from an uninterrupted run")
        for name in ("sampler", "loss_weighting", "gap_schedule", "objective"):
            contracts.load_state(getattr(self, name), state.get(f"{name}_state"))
        return True

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, logger: RunLogger) -> dict[str, float]:
        # Evaluation draws only from its own seeded generators; fork_rng also restores the global
        # RNG should a metric model or a decoder draw from it, so training never sees it.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._evaluate(logger)

    def _evaluate(self, logger: RunLogger) -> dict[str, float]:
        from mfrecipes import evaluate, generate
        from mfrecipes.evaluate import exact

        ev = self.recipe.eval
        net = self.ema.module()
        out_dir = layout.samples_dir(self.run_dir)
        os.makedirs(out_dir, exist_ok=True)
        record: dict[str, float] = {}
        for nfe in ev.nfe:
            n = max(ev.num_samples, ev.grid_size)
            x, y = generate.generate(net, self.info, n, nfe=nfe, seed=ev.seed, device=self.device,
                                     labels="balanced")
            x = x.float().cpu()
            stem = os.path.join(out_dir, f"nfe{nfe}-img{self.images:012d}.png")
            k = self.info.num_classes
            g = ev.grid_size if not k else max(k, ev.grid_size // k * k)  # whole class rows
            self._save_samples(x, y, stem, logger, nfe=nfe, n=n, grid_size=g)
            quality = evaluate.quality(self.dataset, x[:ev.num_samples],
                                       cache_dir=default_cache_dir(self.recipe),
                                       seed=ev.seed)
            for k, v in quality.items():
                record[f"eval/nfe{nfe}/{k}"] = float(v)
        if exact.applies(self.dataset):  # the test bed: noise-free metrics vs the exact flow
            record.update({f"eval/exact/{k}": v for k, v in exact.run_exact(
                net, self.dataset, self.objective, cache_dir=default_cache_dir(self.recipe),
                device=self.device).items()})
        logger.log({"images": self.images, "step": self.step, **record})
        return record

    def _picture_title(self, nfe: int) -> str:
        """The title line of every sample picture: run, steps, images seen, weights."""
        return (f"{self.recipe.run.name} | {nfe}-NFE | {self.images:,} images | "
                f"EMA {next(iter(self.ema.shadows), 'none')}")

    def _save_samples(self, x: torch.Tensor, y, path: str, logger: RunLogger, *, nfe: int,
                      n: int, grid_size: int) -> None:
        """The picture of one evaluation (``plots.save_samples``: scatter, or a titled grid with
        one column per class, latents decoded through the dataset's VAE); a latent run without
        a VAE says so once and gets no grids."""
        from mfrecipes import plots
        from mfrecipes.data.vae import decode_latents
        from mfrecipes.errors import DataError

        modality = self.info.modality
        if modality == "latent" and getattr(self, "_vae_missing", False):
            return
        points = modality == "points"
        try:
            grid = plots.save_samples(
                x if points else x[:grid_size], path, modality=modality,
                title=self._picture_title(nfe),
                labels=y.cpu() if points and y is not None else None,
                reference=self.dataset.reference(n, self.recipe.eval.seed) if points else None,
                class_columns=self.info.num_classes or None,
                decode=lambda z: decode_latents(z, self.info, device=self.device))
        except DataError as err:
            if modality != "latent":
                raise
            self._vae_missing = True
            logger.warning(f"no sample grids for this latent run: {err}", images=self.images,
                           step=self.step)
            return
        if grid is not None:
            logger.image(f"samples/nfe{nfe}", grid, self.images)

    # -- the loop -------------------------------------------------------------------------------
    def _lock(self) -> None:
        """Rank 0 takes the run directory's lock; every rank learns whether it got it."""
        self.lock, refused = None, None
        if self.engine.is_main:
            try:
                self.lock = rundir.RunLock(self.run_dir).acquire()
            except TrainingError as err:
                refused = err.message
        refused = self.engine.broadcast(refused)
        if refused:
            raise TrainingError(refused)

    def run(self) -> dict[str, Any]:
        self._lock()
        try:
            return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> dict[str, Any]:
        cfg, ev = self.recipe.train, self.recipe.eval
        is_main = self.engine.is_main
        # Everything is loaded and checked before any record is written.
        old = rundir.previous_recipe(self.run_dir) if is_main else None
        changes = rundir.resume_changes(old, self.resolved) if old is not None else {}
        resumed = self.resume()
        if is_main:
            write_run_records(self.run_dir, self.resolved, world_size=self.engine.world_size,
                              device=str(self.device))
            rundir.append_history(self.run_dir, {
                "event": "resume" if resumed else "start", "images": self.images,
                "step": self.step, "changed": changes,
                "checkpoint": os.path.basename(self.resumed_from) if resumed else None,
                "notes": self.resume_notes, "world_size": self.world,
                "device": str(self.device)})
        if resumed and is_main:
            truncate_metrics(self.run_dir, self.images)
        init_note = None
        if not resumed and self.recipe.init_from is not None:
            init_note = self.init_weights()
        logger = RunLogger(self.run_dir, cfg.total_images, self.images, enabled=is_main,
                           progress_bar=cfg.progress_bar, loggers=cfg.loggers)
        self.logger = logger  # warnings from inside a step reach the console and the backends
        if init_note:
            logger.info(f"initialised from {init_note}")
        if resumed:
            for note in self.resume_notes:
                logger.warning(note, images=self.images, step=self.step)
            logger.info(f"resumed from {self.images} images (step {self.step}); "
                        f"{self.resume_note}")
        else:
            logger.info(f"training {self.recipe.run.name}: {self.info.name} -> "
                        f"{type(self.net).__name__} "
                        f"({sum(p.numel() for p in self.net.parameters()) / 1e6:.2f}M params), "
                        f"{cfg.total_images} images on {self.device}")
            for name in ("sampler", "loss_weighting", "gap_schedule"):
                record = contracts.description(getattr(self, name))
                if record:
                    logger.log({"images": 0, "step": 0, **{f"{name}/{k}": v for k, v in
                                                          record.items()}}, echo=False)

        mb = self.engine.micro_batch_size()
        accum = self.engine.accumulation_steps()
        batches = self.dataset.batches(mb, start=self.data_position)
        window = {"loss": 0.0, "n": 0, "watched": 0.0, "nw": 0, "t0": time.time(),
                  "images0": self.images}
        result: dict[str, Any] = {}
        try:
            while self.images < cfg.total_images:
                if self._stage_at(self.images) != self.stage_idx:
                    self._enter_stage(self._stage_at(self.images))
                    logger.log({"images": self.images, "step": self.step,
                                "stage": self.stage.name}, echo=False)
                    logger.info(f"stage {self.stage.name}: images {self.stage.start}-"
                                f"{self.stage.end}")
                lr = self.engine.set_lr(self.images + cfg.global_batch_size)
                loss_value, diag, grad_norm = self._train_step(batches, mb, accum)  # all ranks
                before = self.images
                self.images += cfg.global_batch_size
                self.step += 1
                logger.advance(self.images, "  ".join(  # the figures that move
                    f"{k[4:]} {diag[k]:.4g}" for k in ("obj/v_loss", "obj/u_err") if k in diag)
                    or f"loss {loss_value:.4g}")
                if math.isfinite(loss_value):
                    window["loss"] += loss_value
                    window["n"] += 1
                if math.isfinite(self.watched_loss):
                    window["watched"] += self.watched_loss
                    window["nw"] += 1
                if _crossed(before, self.images, cfg.log_every_images) or \
                        self.images >= cfg.total_images:
                    dt = max(time.time() - window["t0"], 1e-9)
                    logger.log({"images": self.images, "step": self.step,
                                # No finite step in the window: NaN, never a silent 0.
                                "loss": window["loss"] / window["n"] if window["n"] else math.nan,
                                "grad_norm": grad_norm, "lr": lr,
                                "img_per_s": (self.images - window["images0"]) / dt,
                                "nonfinite": self.nonfinite,
                                **diag, **self._pacing_record(window),
                                **self.dataset.counters()})
                    window = {"loss": 0.0, "n": 0, "watched": 0.0, "nw": 0, "t0": time.time(),
                              "images0": self.images}
                done = self.images >= cfg.total_images
                if _crossed(before, self.images, ev.every_images) and not done and is_main:
                    result.update(self.evaluate(logger))
                if _crossed(before, self.images, cfg.checkpoint_every_images) or done:
                    self.save()
            if ev.at_end and is_main:
                result.update(self.evaluate(logger))
            if self.nonfinite and is_main:
                logger.warning(f"{self.nonfinite} update(s) were skipped for a non-finite "
                               f"loss or gradient (limit train.max_nonfinite="
                               f"{cfg.max_nonfinite}); see 'nonfinite' in metrics.jsonl",
                               images=self.images, step=self.step)
        finally:
            logger.close()
        return {"images": self.images, "step": self.step, "nonfinite": self.nonfinite, **result}

    def _pacing_record(self, window: dict) -> dict[str, float]:
        """For a sampler that reacts to training (DTD): its state and the loss it watches (the
        mean unweighted r = t error over the log window), at every log line."""
        if contracts.observer(self.sampler) is None:
            return {}
        out = {f"sampler/{k}": v for k, v in contracts.description(self.sampler).items()}
        if window["nw"]:
            out["sampler/watched_loss"] = window["watched"] / window["nw"]
        return out

    def _warn(self, text: str) -> None:
        """A warning at the current images and step, through the run logger (rank 0 only: the
        logger of other ranks is disabled)."""
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.warning(text, images=self.images, step=self.step)
        elif self.engine.is_main:  # before the logger exists: Python's logging only
            import logging

            logging.getLogger(__name__).warning("%s", text)

    def _check_backbone(self, who, when, net, z, t, r, y) -> None:
        """The backbone's output shape on the step's first micro batch (no gradient; torch's
        RNG restored, so dropout draws do not shift the run)."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self.engine.autocast():
            u = net(z, t, t - r, y)
        contracts.enforce(who, when, contracts.backbone_checks(u, z))

    def _train_step(self, batches, mb: int, accum: int) -> tuple[float, dict, float]:
        progress = self.progress()
        # (t, r) and noise for the whole global batch, identical on every rank; this rank takes
        # rows rank::world, micro batch by micro batch (so the draws do not depend on the world).
        global_b = mb * accum * self.world
        t_all, r_all = self.sampler.sample(global_b, progress=progress,
                                           generator=self.streams.timesteps, device=self.device)
        check = self._contracts_pending  # the stage's first step only; then {}
        self._contracts_pending = {}
        when = f"on the first step (batch {global_b}, {self.images} images)"
        if check:
            contracts.enforce(check["timestep_sampler"], when,
                              contracts.sampler_checks(t_all, r_all, global_b))
        noise_all = torch.randn((global_b, *self.info.sample_shape), generator=self.streams.noise)
        extra = {"generator": self.streams.objective} if self._objective_takes_generator else {}
        mine = slice(self.rank, None, self.world)
        t_all, r_all, noise_all = t_all[mine], r_all[mine], noise_all[mine]
        total = 0.0
        # The unweighted error of the r = t rows (what a curriculum watches): sum and count, so
        # the mean over micro batches and ranks is over rows; on the device, read once per step.
        v_stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        diag: dict[str, float] = {}
        for a in range(accum):
            x, y = next(batches)
            self.data_position += x.shape[0]
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device) if y is not None else None
            rows = slice(a * mb, (a + 1) * mb)
            t, r = t_all[rows], r_all[rows]
            noise = noise_all[rows].to(self.device)
            net, ema_net = self.net, self.ema.module()
            if self.augment is not None:
                x, labels = self.augment(x, generator=self.streams.augment)
                x, noise = LabelChannels.planes(x, labels), LabelChannels.planes(noise, labels)
                net = self._aug_net
                ema_net = None if ema_net is None else LabelChannels(ema_net, net.image_channels)
            if check and a == 0:
                self._check_backbone(check["backbone"], when, net, noise, t, r, y)
            with self.engine.autocast():
                out = self.objective(net, x, y, t, r, noise, progress=progress,
                                     ema_net=ema_net, **extra)
            if check and a == 0:  # a non-finite err is the non-finite counter's business
                contracts.enforce(check["objective"], when,
                                  contracts.objective_checks(out, x.shape[0], finite=False))
            err = out.err.float()
            v_rows = ~out.is_average
            v_stats += torch.stack([torch.where(v_rows, err.detach(), 0.0).sum(),
                                    v_rows.sum()]).double()
            # Loss = mean(adaptive [* MinSNR alpha] * progressive beta * err) (Kim et al., Eqs. 8-9)
            w_loss = self.loss_weighting.weights(err, t, r)
            w_gap = self.gap_schedule.weights(t, r, progress)
            if check and a == 0:
                contracts.enforce(check["loss_weighting"], when,
                                  contracts.weighting_checks(w_loss, x.shape[0]))
                contracts.enforce(check["gap_schedule"], when,
                                  contracts.gap_checks(w_gap, t, r))
            w = w_loss * w_gap
            w = w * out.loss_scale  # the objective's own row factor (AlphaFlow's alpha)
            loss = (w.detach() * err).mean() / accum
            self.engine.backward(loss)
            total += float(loss.detach())
            for k, v in out.diagnostics.items():
                diag[f"obj/{k}"] = diag.get(f"obj/{k}", 0.0) + float(v) / accum
        # The mean over ranks: what is logged, what samplers observe, what decides a skip.
        v_sum, v_count = v_stats.tolist()
        total, v_sum, v_count, *values = self.engine.mean_across_ranks(
            [total, v_sum, v_count, *diag.values()])
        diag = dict(zip(diag, values))
        # The mean unweighted v error, NaN when no row had r = t (nothing to observe).
        self.watched_loss = v_sum / v_count if v_count > 0 else math.nan
        max_nonfinite = self.stage.recipe.train.max_nonfinite
        if math.isfinite(total):
            self.engine.step()  # clips; drops the update itself if the gradient is non-finite
            grad_norm = self.engine.grad_norm()
        else:
            self.engine.skip()  # never step on a non-finite loss
            grad_norm = math.nan
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            self.nonfinite += 1
            self._warn(f"non-finite loss/gradient at {self.images} images "
                       f"({self.nonfinite}/{max_nonfinite} allowed); update skipped")
            if self.nonfinite > max_nonfinite:
                raise TrainingError(
                    f"{self.nonfinite} non-finite losses by {self.images} images (limit "
                    f"train.max_nonfinite={max_nonfinite}); nothing non-finite was saved and "
                    f"{self.last_good_checkpoint()}. Lower train.lr, set train.grad_clip, or "
                    f"check the data")
            return total, diag, grad_norm
        # The update itself can blow up (lr or weight decay inf, a NaN clip): one norm over
        # the weights (float32 overflows for magnitudes beyond ~1e19). Data-parallel ranks hold
        # the same weights after a step (ZeRO 1 and 2 gather them), so every rank decides alike
        # without another collective.
        norms = torch._foreach_norm([p.detach() for p in self.net.parameters()])
        pnorm = float(torch.stack(norms).float().norm())
        if not math.isfinite(pnorm):
            raise TrainingError(
                f"the weights are not finite after the update at {self.images} images "
                f"(loss {total:.4g} and gradient norm {grad_norm:.4g} were finite: the "
                f"update blew up; train.lr={self.stage.recipe.train.lr}, "
                f"weight_decay={self.stage.recipe.train.weight_decay}, "
                f"grad_clip={self.stage.recipe.train.grad_clip}); nothing was saved after it "
                f"and {self.last_good_checkpoint()}")
        self.ema.update(self.net)
        watcher = contracts.observer(self.sampler)
        if watcher is not None and math.isfinite(self.watched_loss):
            # The unweighted r = t error, never the weighted loss: with adaptive weighting
            # w * err = err / (err + c) ~ 1 is flat, and a curriculum fed it would open a cluster
            # every `patience` steps whatever the model learns.
            watcher.observe(self.watched_loss, progress)
        return total, diag, grad_norm


def train(recipe: Recipe, resolved: dict, run_dir: str, **options) -> dict[str, Any]:
    return Trainer(recipe, resolved, run_dir, **options).run()
