"""DeepSpeed ZeRO (stages 1 and 2) as a training engine; the only module that imports deepspeed.

Chosen by ``engine: deepspeed`` and configured under ``deepspeed:``. It gives the loop the same
interface as ``SingleEngine`` (``engine.py``), so the loop reads the same for one process and many.

Batch sizes have one source of truth, ``train:``. Per rank, the micro batch is
``train.micro_batch_size`` or, when unset, ``global_batch_size / world_size``; the accumulation
steps are ``global / (micro * world)``; anything that does not divide is a ``RecipeError``. The
DeepSpeed config is derived from these numbers (``train_batch_size``,
``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``gradient_clipping`` from
``train.grad_clip``, ``zero_optimization.stage`` from ``deepspeed.zero_stage``) and the
``deepspeed.config`` block is merged on top for everything else (bucket sizes, overlap_comm, ...).
The optimiser is torch's AdamW built here from ``train:`` (no DeepSpeed ``optimizer`` block, and
no fused-op build on first use).

The JVP. The objective receives the raw module (``engine.module``): torch.func.jvp cannot trace
through the DeepSpeed wrapper, and under ZeRO 1 and 2 every rank holds the full parameters, so
the raw module is the model. Gradients are still reduced across ranks: ZeRO's hooks sit on the
parameters and fire on ``engine.backward(loss)`` whichever path the forward took, and this engine
marks the accumulation boundary itself (``set_gradient_accumulation_boundary``) because the loop
never calls the wrapper's forward. ZeRO 3 is refused by the recipe schema: it gathers parameters
inside the forward, which torch.func transforms cannot trace.

Precision (``deepspeed.bf16: true`` or ``train.precision: bf16``). Parameters, gradients, their
all-reduce, the master weights and the AdamW moments stay fp32; the forward runs under
``torch.autocast(bfloat16)`` (``autocast()``). With ``objective.params.jvp_dtype: float32`` the
MeanFlow objective then computes the JVP and its target with autocast off, in fp32, as the
official MeanFlow code does: bf16 rounding of du/dt is multiplied by (t - r) and lands in the
target. The price: the JVP pass loses bf16's speed and memory savings, and the fp32 weights cost
4 bytes a parameter on every rank. DeepSpeed's own bf16 mode (``deepspeed.config: {bf16:
{enabled: true}}``) instead stores the module in bf16 (half the weight memory, bf16 gradients and
all-reduce, fp32 master weights in the optimiser); the JVP then necessarily runs with bf16
weights, so it cannot be combined with ``jvp_dtype: float32`` (refused), and EMAs are updated
from the bf16 weights. Never fp16: JVP tangents overflow it.

Non-finite updates. DeepSpeed checks the global gradient norm in its step, on every rank alike,
and drops an update whose gradient is inf/NaN; ``grad_norm()`` then reads inf. ZeRO stage 0 has
no such check, so for stage 0 this engine clips and checks the (already all-reduced) gradients
itself.

Checkpoints (``save_native`` / ``load_state_dict``). Every rank writes its ZeRO partition with
``engine.save_checkpoint`` into the checkpoint's temporary folder (``deepspeed/``) before the
atomic rename. ``state_dict()`` also gathers the optimiser state into one engine-neutral copy in
torch's AdamW layout, which rank 0 saves with the train state. A resume, whatever the world size or
engine, takes the weights (fp32 master copies included) from the plain safetensors file and the
AdamW moments from that consolidated copy; DeepSpeed's files are written for its own tools and
never read back, because DeepSpeed loads them with full unpickling (code from a file would run).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import socket
from typing import Any, Optional

import torch
from torch import nn

from mfrecipes.errors import RecipeError, TrainingError
from mfrecipes.recipe.schema import Recipe, TrainCfg
from mfrecipes.train.engine import Engine

NATIVE_DIR = "deepspeed"     # inside a checkpoint folder
NATIVE_TAG = "state"
# deepspeed.config keys that would be a second source of truth for something set elsewhere.
_OWNED = {
    "optimizer": "the optimiser is AdamW built from train.lr, train.betas, train.weight_decay",
    "scheduler": "the learning rate follows train.lr and train.lr_schedule (per stage)",
    "gradient_clipping": "set train.grad_clip",
    "fp16": "fp16 is not supported (JVP tangents overflow it); use deepspeed.bf16: true",
    "torch_autocast": "set deepspeed.bf16: true (autocast is applied around the objective)",
    "amp": "set deepspeed.bf16: true",
}


def _import_deepspeed(device_type: str):
    """Import deepspeed quietly; on CPU use the CPU accelerator and plain gloo collectives."""
    if device_type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if device_type != "cuda":
        # The shared-memory all-reduce op is compiled on first use (minutes); gloo's is enough.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    return deepspeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_plan(cfg: TrainCfg, world_size: int, path: str = "train") -> tuple[int, int]:
    """``(micro batch per rank, accumulation steps)``; global = micro * accum * world (the rule
    lives in ``recipe.schema.batch_plan``, which ``mfr check --world-size`` uses too)."""
    from mfrecipes.recipe.schema import batch_plan as plan

    return plan(cfg, world_size, path)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def deepspeed_config(recipe: Recipe, world_size: int) -> dict:
    """The DeepSpeed config: numbers derived from ``train:``, ``deepspeed.config`` for the rest."""
    user = recipe.deepspeed.config
    for key, why in _OWNED.items():
        if key in user:
            raise RecipeError(f"{key} cannot be set here: {why}", path=f"deepspeed.config.{key}")
    if "stage" in user.get("zero_optimization", {}):
        raise RecipeError("the ZeRO stage is deepspeed.zero_stage",
                          path="deepspeed.config.zero_optimization.stage")
    mb, accum = batch_plan(recipe.train, world_size)
    clip = recipe.train.grad_clip or 0.0
    base = {
        "train_batch_size": recipe.train.global_batch_size,
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": accum,
        # Stage 0 has no non-finite check in DeepSpeed: there this engine clips itself.
        "gradient_clipping": clip if recipe.deepspeed.zero_stage else 0.0,
        "zero_optimization": {"stage": recipe.deepspeed.zero_stage},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    cfg = _merge(base, user)
    native_bf16 = bool(cfg.get("bf16", {}).get("enabled", False))
    if native_bf16:
        if recipe.deepspeed.zero_stage == 0:
            raise RecipeError("DeepSpeed's bf16 mode needs zero_stage 1 or 2 here; or drop "
                              "deepspeed.config.bf16 and set deepspeed.bf16: true (fp32 weights, "
                              "bf16 autocast)", path="deepspeed.config.bf16")
        if recipe.objective.params.get("jvp_dtype") == "float32":
            raise RecipeError("objective.params.jvp_dtype float32 needs fp32 module weights, but "
                              "DeepSpeed's bf16 mode stores them in bf16; use deepspeed.bf16: true "
                              "(fp32 weights, bf16 autocast) instead of deepspeed.config.bf16",
                              path="deepspeed.config.bf16")
        # Never step on a non-finite gradient, in bf16 too.
        cfg["bf16"].setdefault("check_grad_overflow", True)
    return cfg


class DeepSpeedEngine(Engine):
    """ZeRO 1/2 data parallelism behind the loop's engine interface (``engine.Engine``)."""

    @staticmethod
    def launch(device: torch.device) -> tuple[int, int, torch.device]:
        """Join the process group; return ``(rank, world size, this rank's device)``.

        Launched by ``torchrun`` or ``deepspeed``, the ranks come from the environment; a plain
        ``mfr run`` becomes a group of one.
        """
        deepspeed = _import_deepspeed(device.type)
        if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        import torch.distributed as dist

        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), device

    def __init__(self, net: nn.Module, recipe: Recipe, device: torch.device):
        import torch.distributed as dist

        deepspeed = _import_deepspeed(device.type)
        self.dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.recipe = recipe
        self.zero_stage = recipe.deepspeed.zero_stage
        self.ds_config = deepspeed_config(recipe, self.world_size)
        self.native_bf16 = bool(self.ds_config.get("bf16", {}).get("enabled", False))
        self.bf16 = self.native_bf16 or recipe.deepspeed.bf16 or recipe.train.precision == "bf16"
        self._plan = batch_plan(recipe.train, self.world_size)
        # The engines' shared AdamW, so that the consolidated state has the same layout.
        self._make_optimizer(net, recipe.train)
        self.ds, _, _, _ = deepspeed.initialize(model=net, optimizer=self.optimizer,
                                                model_parameters=net.parameters(),
                                                config=self.ds_config)
        self.module = self.ds.module  # the raw network; the objective calls it directly
        self._micro = 0

    # -- the loop's interface ---------------------------------------------------------------
    def configure(self, cfg: TrainCfg) -> None:
        """Apply a stage's optimiser settings (lr, betas, weight decay, clipping) in place."""
        if batch_plan(cfg, self.world_size) != self._plan:
            raise RecipeError("a stage changes the batch sizes; with engine deepspeed every "
                              "stage must keep train.global_batch_size and train.micro_batch_size",
                              path="stages")
        super().configure(cfg)
        if self.zero_stage:
            self.ds.optimizer.clip_grad = cfg.grad_clip or 0.0

    def micro_batch_size(self) -> int:
        return self._plan[0]

    def accumulation_steps(self) -> int:
        return self._plan[1]

    def autocast(self):
        """bf16 autocast around the objective when bf16 is on (on CPU too); weights stay fp32."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate ``loss``'s gradient; the last micro batch of a step reduces across ranks."""
        self._micro += 1
        # The loop never calls the wrapper's forward, so do what it would: reset the hooks'
        # per-step state and say whether this micro batch ends the accumulation.
        if hasattr(self.ds.optimizer, "clear_backward_seen_flag"):
            self.ds.optimizer.clear_backward_seen_flag()
        self.ds.set_gradient_accumulation_boundary(self._micro >= self.accumulation_steps())
        self.ds.backward(loss, scale_wrt_gas=False)  # the loop already divides by accum

    def step(self) -> None:
        """Clip and update; DeepSpeed drops the update (on every rank) if the gradient is
        non-finite, and ``grad_norm()`` then reads inf."""
        self._micro = 0
        if self.zero_stage == 0:
            max_norm = self.cfg.grad_clip if self.cfg.grad_clip is not None else math.inf
            norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))
            self._grad_norm = norm
            if not math.isfinite(norm):
                self.ds.zero_grad()
                return
            self.ds.step()
            return
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        self._grad_norm = norm if self.ds.was_step_applied() else math.inf

    def skip(self) -> None:
        """Drop the accumulated gradients without updating (the loss was non-finite)."""
        self._micro = 0
        if self.zero_stage == 0:
            self.ds.zero_grad()
            return
        # A non-finite loss makes the gradient non-finite, which DeepSpeed's step discards on
        # every rank (it reduces the norm first); this keeps its partitioned buffers consistent.
        self.ds.step()
        if self.ds.was_step_applied():
            raise TrainingError("DeepSpeed applied an update although the loss was non-finite "
                                "(its gradient was finite); stopping rather than training on it")
        self._grad_norm = math.inf

    # -- collectives ----------------------------------------------------------------------------
    def _tensor_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def mean_across_ranks(self, values: list[float]) -> list[float]:
        buf = torch.tensor(values, dtype=torch.float64, device=self._tensor_device())
        self.dist.all_reduce(buf)
        return (buf / self.world_size).tolist()

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.dist.barrier()

    # -- weights and state ----------------------------------------------------------------------
    def _mapped(self) -> bool:
        return self.zero_stage > 0 and any(hasattr(p, "_hp_mapping")
                                           for p in self.module.parameters())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The raw weights, fp32 master copies where DeepSpeed keeps them (every rank calls)."""
        sd = self.module.state_dict()
        if not self.native_bf16:
            return sd
        from deepspeed.utils import safe_get_full_fp32_param

        names = {id(p): n for n, p in self.module.named_parameters()}
        for p in self.module.parameters():
            sd[names[id(p)]] = safe_get_full_fp32_param(p).detach().cpu()
        return sd

    def load_weights(self, sd: dict[str, torch.Tensor]) -> None:
        """Load raw weights into the module and into ZeRO's fp32 master partitions."""
        self.module.load_state_dict(sd)
        if self._mapped():
            from deepspeed.utils import safe_set_full_fp32_param

            for name, p in self.module.named_parameters():
                safe_set_full_fp32_param(p, sd[name].to(self.device, torch.float32))

    def state_dict(self) -> dict:
        """Engine-neutral optimiser state in torch's AdamW layout, gathered from the ZeRO
        partitions (every rank calls; rank 0 saves it)."""
        state: dict[str, Any] = {"kind": "deepspeed", "world_size": self.world_size,
                                 "zero_stage": self.zero_stage}
        if not self._mapped():
            state["optimizer"] = self.optimizer.state_dict()
            return state
        from deepspeed.utils import safe_get_full_optimizer_state

        params = list(self.module.parameters())
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        full: dict[str, Any] = {"state": {}, "param_groups": [dict(group,
                                                                  params=list(range(len(params))))]}
        inner = [s for s in self.optimizer.state.values() if s]
        if inner:
            step = inner[0]["step"]
            for i, p in enumerate(params):
                full["state"][i] = {"step": step.detach().clone().cpu()}
                for key in ("exp_avg", "exp_avg_sq"):
                    value = safe_get_full_optimizer_state(p, key)
                    full["state"][i][key] = value.detach().to("cpu", torch.float32).clone()
        state["optimizer"] = full
        return state

    def save_native(self, folder: str) -> None:
        """Every rank writes its part of DeepSpeed's checkpoint into ``folder/deepspeed``."""
        target = os.path.join(folder, NATIVE_DIR)
        self.ds.save_checkpoint(target, tag=NATIVE_TAG, save_latest=False)

    def load_state_dict(self, state: dict, folder: Optional[str] = None) -> str:
        """Restore the optimiser from the consolidated copy; returns a line saying from what.

        DeepSpeed's own files are never read: its loader unpickles them in full (any object,
        hence any code, a planted file holds). The plain weights (loaded before this) and the
        consolidated AdamW moments in ``train_state.pt`` (tensors only) restore the same fp32
        partitions and moments, bit for bit at the same world size.
        """
        full = state.get("optimizer")
        if not full or "state" not in full:
            return "no optimiser state (reinitialised)"
        if not self._mapped():
            self.optimizer.load_state_dict(full)
        elif not self._load_full_optimizer_state(full):
            # The note reaches the run logger with the other resume notes.
            return ("no optimiser state: this DeepSpeed version cannot take a consolidated "
                    "optimiser state; AdamW moments reinitialised")
        src = (f"world size {state.get('world_size', 1)}, "
               f"{'ZeRO ' + str(state['zero_stage']) if 'zero_stage' in state else 'single'}")
        return f"consolidated optimiser state ({src})"

    def _load_full_optimizer_state(self, full: dict) -> bool:
        """Fill ZeRO's partitions from a consolidated state; False when this DeepSpeed
        version cannot (the moments stay fresh)."""
        from deepspeed.utils import safe_set_full_optimizer_state

        if not full["state"]:
            return True
        zero = self.ds.optimizer
        if not hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            return False
        step = full["state"][0]["step"]
        # AdamW creates its state lazily on the first step: create it on the flat fp32
        # partitions, link the per-parameter views, then fill them.
        for flat in zero.single_partition_of_fp32_groups:
            self.optimizer.state[flat] = {"step": step.detach().clone().float(),
                                          "exp_avg": torch.zeros_like(flat),
                                          "exp_avg_sq": torch.zeros_like(flat)}
        zero._lazy_init_hp_params_optimizer_state()
        for i, p in enumerate(self.module.parameters()):
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, full["state"][i][key].to(self.device), key)
        return True
