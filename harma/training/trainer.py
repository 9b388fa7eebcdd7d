"""The training run: HarMA adapters, LoRA or full fine-tuning of an open_clip CLIP for
image-text retrieval, on one process or many (``torchrun``), with exact resumption.

`train` runs a `TrainConfig` through a `Trainer`, whose steps are its methods: `Trainer.setup`
(datasets, folder, model, loss, optimizer), `Trainer.restore` (a resume state),
`Trainer.train_epoch`, `Trainer.evaluate`, `Trainer.save_state` (the epoch's weights and resume
state) and `Trainer.finish` (test of the best checkpoint, ``results.json``).

Outputs of a run, in ``output_dir`` (see ``docs/training.md``): ``config.json``,
``metrics.jsonl`` (one JSON line per epoch, with the zero-shot and extra retrieval sets of
`harma.training.monitor` where the run names some), ``training_curves.png`` (loss and validation
mR per epoch, when matplotlib is installed), ``last.safetensors`` and ``best.safetensors`` (the
trained tensors only; best is chosen on the validation split), ``last_state.pt`` (everything
needed to resume) and ``results.json`` (test metrics of the best checkpoint).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from .._precision import set_tf32
from ..distributed import (
    barrier,
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed_from_env,
    is_distributed,
    is_main_process,
    raise_on_any_rank,
)
from ..inject import count_parameters
from ..io import copy_atomically, nonfinite_tensors
from ..losses import HarmaLoss
from ..retrieval import RetrievalEvaluator
from .config import TrainConfig, cuda_problem
from .curves import plot_training_curves
from .data import ImageReadError, TokenizingCollate, build_datasets
from .models import build_model, build_tokenizer, check_init_adapters, check_pretrained_source
from .monitor import MonitorSets, monitor_results, short_monitors
from .optim import LinearWarmupDecay, build_optimizer
from .report import short_metrics
from .state import (
    BEST_WEIGHTS_NAME,
    CONFIG_NAME,
    CURVES_NAME,
    LAST_WEIGHTS_NAME,
    METRICS_NAME,
    RESULTS_NAME,
    RUN_FILES,
    STATE_FORMAT,
    STATE_NAME,
    STATE_VERSION,
    check_output_dir,
    check_writable_folder,
    holds_no_checkpoint,
    leftover_temporary_files,
    read_state,
    rng_state,
    save_state,
    set_rng_state,
    state_path,
    write_json,
    write_metrics,
)
from .weights import load_trainable_state, load_trained_weights, save_trained_weights, trainable_state

__all__ = ["EpochStats", "NonFiniteError", "Trainer", "apply_precision", "train"]


def _log(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


class NonFiniteError(RuntimeError):
    """The run diverged: a loss, gradient or trained tensor became NaN or infinite."""


def _seed_numpy_in_worker(worker_id: int) -> None:
    # torch seeds its own and Python's generators in each worker; numpy is left alone.
    np.random.seed(torch.initial_seed() % 2**32)


def _derived_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key, well mixed (SeedSequence)."""
    state = np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resolve_device(config: TrainConfig, local_rank: int) -> torch.device:
    """The device ``config.device`` names; ``auto`` is this process's GPU, or the CPU."""
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    problem = cuda_problem(config.device if config.device != "auto" else "cuda")
    if problem:
        raise ValueError(f"TrainConfig.device: {problem}")
    if config.device.startswith("cuda:"):
        return torch.device(config.device)
    return torch.device("cuda", local_rank)


def apply_precision(precision: str, tf32: bool | None, device: torch.device) -> torch.dtype | None:
    """Apply a run's numeric settings on ``device`` and return its autocast dtype.

    The same settings make training, its evaluations and a later ``examples/evaluate.py --run``
    compute the same embeddings. Retrieval scores are computed in full float32 whatever this
    sets (`harma.retrieval.retrieval_metrics_from_embeddings`).

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (`TrainConfig.precision`).
        tf32: on CUDA, let float32 matrix products and convolutions run in TF32 (True) or not
            (False), process-wide; None leaves PyTorch's setting as it is. Ignored elsewhere.
        device: where the model runs.

    Returns:
        The autocast dtype: None for fp32, else ``torch.bfloat16`` or ``torch.float16``.

    Raises:
        ValueError: an unknown ``precision``.
    """
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision must be one of {tuple(dtypes)}, got {precision!r}")
    if tf32 is not None and device.type == "cuda":
        set_tf32(tf32)
    return dtypes[precision]


def _autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``config.precision`` (None for fp32)."""
    if config.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return apply_precision(config.precision, None, device)


def _plot_curves(output_dir: Path) -> bool:
    """Redraw ``training_curves.png`` from ``metrics.jsonl``. A picture must never end a run:
    on failure, warn once and return False so the caller stops trying."""
    try:
        plot_training_curves(output_dir / METRICS_NAME, output_dir / CURVES_NAME)
    except ImportError as error:
        _log(f"[harma] warning: {CURVES_NAME} is not drawn: {error}")
        return False
    except Exception as error:  # whatever went wrong, training goes on
        _log(f"[harma] warning: drawing {CURVES_NAME} failed ({type(error).__name__}: {error}); no more "
             f"curves this run (redraw later with harma.training.curves.plot_training_curves)")
        return False
    return True


class _ContrastiveStep(nn.Module):
    """Model and loss in one module, so DDP also averages the temperature's gradient."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, image_ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        output = self.model(images, tokens)
        if isinstance(output, Mapping):
            image_embeds, text_embeds = output["image_features"], output["text_features"]
        else:
            image_embeds, text_embeds = output[0], output[1]
        losses = self.loss(image_embeds, text_embeds, image_ids, labels)
        affiliation = losses.affiliation if losses.affiliation is not None else losses.loss.new_zeros(())
        return losses.loss, losses.contrastive, losses.triplet, affiliation


@dataclass
class EpochStats:
    """What one epoch of training gave: mean losses over its micro-steps, the last learning
    rate, and its optimizer steps."""

    losses: dict[str, float]
    lr: float
    steps: int
    skipped_steps: int = 0


class Trainer:
    """One training run of a `TrainConfig` on this process (every ``torchrun`` process has one).

    Use `train` unless you need to drive the steps yourself: ``setup()``, then ``restore(state)``
    when resuming, then per epoch ``train_epoch()``, ``evaluate(val_set)``, ``save_state(...)``,
    and ``finish()``; `run` does exactly that.

    Args:
        config: the recipe; ``config.output_dir`` is the run folder.
        device: where to train (see `resolve_device`).
        overwrite: replace the run files of a non-empty ``output_dir``.
    """

    def __init__(self, config: TrainConfig, device: torch.device, *, overwrite: bool = False) -> None:
        self.config = config
        self.device = device
        self.overwrite = overwrite
        self.output_dir = Path(config.output_dir)
        self.rank, self.world_size = get_rank(), get_world_size()
        self.autocast_dtype = _autocast_dtype(config, device)
        self.epoch, self.global_step = 0, 0
        self.best_metric, self.best_epoch = -math.inf, None
        self.skipped_steps = 0
        self.history: list[dict[str, Any]] = []
        self.draw_curves = is_main_process()
        self.start_time = time.time()

    # ------------------------------------------------------------------------------ setup

    def setup(self, *, fresh: bool = True) -> None:
        """Check the inputs, prepare the run folder and build everything.

        Args:
            fresh: a new run: ``output_dir`` must be empty (or hold no checkpoint, or
                ``overwrite`` was given) and gets ``config.json``. False when resuming: the
                folder is used as it is, and `restore` follows.

        Raises:
            FileExistsError: a fresh run in a folder holding another run's checkpoints.
        """
        check_output_dir(self.output_dir, resume=not fresh, overwrite=self.overwrite)
        if is_main_process():
            for leftover in leftover_temporary_files(self.output_dir):
                leftover.unlink(missing_ok=True)  # an interrupted write of an earlier start
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        apply_precision(self.config.precision, self.config.tf32, self.device)
        self._build_datasets()
        if fresh:
            self._prepare_folder()
        self._build_model()
        self._build_optimizer()
        self._log_plan()

    def _build_datasets(self) -> None:
        # Inputs and the output folder first: a wrong path fails before minutes of model loading.
        # Every rank checks.
        error: BaseException | None = None
        try:
            check_writable_folder(self.output_dir)
            self.train_set, self.val_set, self.test_set = build_datasets(self.config)
            self.monitors = self._read_monitored_sets()
            check_pretrained_source(self.config.pretrained)
            check_init_adapters(self.config.init_adapters)  # TrainConfig allows it with method harma only
        except (OSError, ValueError) as caught:
            error = caught
        raise_on_any_rank(error)

    def _read_monitored_sets(self) -> MonitorSets:
        config = self.config
        if not (config.zero_shot_sets or config.extra_retrieval_files):
            return MonitorSets()
        tokenizer = build_tokenizer(config.model, config.model_config)
        return MonitorSets.from_config(config, tokenizer, self.device, self.autocast_dtype)

    def _prepare_folder(self) -> None:
        if is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.overwrite or holds_no_checkpoint(self.output_dir):
                for name in RUN_FILES:
                    (self.output_dir / name).unlink(missing_ok=True)
            self.config.save(self.output_dir / CONFIG_NAME)
        barrier()

    def _build_model(self) -> None:
        config = self.config
        # Same seed on every rank: identical initial adapters (DDP also broadcasts rank 0's).
        _seed_everything(config.seed)
        self.model = build_model(config).to(self.device)
        self.tokenizer = build_tokenizer(config.model, config.model_config)
        self.loss = HarmaLoss(
            temperature_init=config.temperature_init,
            learnable_temperature=config.learnable_temperature,
            margin=config.margin,
            gamma=config.gamma,
            hardest_negative=config.hardest_negative,
            same_image_positive=config.same_image_positive,
            affiliation_weight=config.affiliation_weight,
        ).to(self.device)
        self.step_module: nn.Module = _ContrastiveStep(self.model, self.loss)
        if is_distributed():
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def _steps_per_epoch(self) -> int:
        config = self.config
        micro_batches = len(self.train_set) // (config.batch_size * self.world_size)
        steps = micro_batches // config.grad_accum_steps
        if config.max_steps_per_epoch is not None:
            steps = min(steps, config.max_steps_per_epoch)
        if steps < 1:
            raise ValueError(
                f"the training set has {len(self.train_set)} pairs, fewer than one optimizer step of "
                f"batch_size {config.batch_size} x {self.world_size} process(es) x grad_accum_steps "
                f"{config.grad_accum_steps}; lower batch_size"
            )
        return steps

    def _build_optimizer(self) -> None:
        self.steps_per_epoch = self._steps_per_epoch()
        self.optimizer = build_optimizer(self.model, self.loss, self.config)
        self.schedule = LinearWarmupDecay.from_fraction(
            self.config.warmup_fraction, self.steps_per_epoch * self.config.epochs
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.config.precision == "fp16")

    def _log_plan(self) -> None:
        config, counts = self.config, count_parameters(self.model)
        self.trainable_count = counts.trainable + int(config.learnable_temperature)
        self.total_count = counts.all
        _log(
            f"[harma] method={config.method} model={config.model} pretrained={config.pretrained} "
            f"device={self.device} processes={self.world_size} precision={config.precision}\n"
            f"[harma] trainable parameters {self.trainable_count:,} of {counts.all:,} "
            f"({100 * counts.trainable / max(counts.all, 1):.2f}%), loss temperature included\n"
            f"[harma] train {len(self.train_set):,} pairs / {self.train_set.num_images:,} images, "
            f"{self.steps_per_epoch} steps per epoch x {config.epochs} epochs, global batch "
            f"{config.batch_size * self.world_size * config.grad_accum_steps}, "
            f"warm-up {self.schedule.warmup_steps} steps"
        )
        carved = self.val_set.describe().get("carved") if self.val_set is not None else None
        if carved:
            _log(f"[harma] validation: {self.val_set.num_images:,} images ({carved['fraction']:.1%}) held out of "
                 f"the training images with val_seed {carved['seed']}")
        if self.monitors:
            _log(self.monitors.describe() + "\n[harma] these sets are evaluated before training and at every "
                 "validation, to see what adaptation forgets; the best epoch is chosen on the validation split only")

    # ---------------------------------------------------------------------------- restore

    def check_resumable(self, state: Mapping[str, Any]) -> None:
        """Refuse a resume state saved by another number of processes (before anything is built)."""
        if state.get("world_size") != self.world_size:
            raise ValueError(
                f"the run was started with {state.get('world_size')} process(es) and is resumed with "
                f"{self.world_size}: the data order and global batch would differ; resume with the same count"
            )

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a resume state written by `save_state` (see `harma.training.state`)."""
        self.check_resumable(state)
        load_trainable_state(self.model, state["trainable"], "the resume state")
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best_epoch = state["best_epoch"]
        self.best_metric = state["best_metric"] if self.best_epoch is not None else -math.inf
        self.history = list(state["history"])
        self.skipped_steps = state.get("skipped_steps", 0)
        if is_main_process():
            set_rng_state(state["rng"])
            write_metrics(self.output_dir / METRICS_NAME, self.history)
        finished = self.epoch >= self.config.epochs
        _log(f"[harma] resumed '{self.output_dir}' after epoch {self.epoch} (step {self.global_step})"
             + ("; the run had finished: evaluating its best checkpoint again" if finished else ""))
        if state.get("pending_validation"):
            _log(f"[harma] epoch {self.epoch} was saved but not validated: validating it now")
            self.complete_epoch()

    # ------------------------------------------------------------------------------ train

    def _loader(self) -> DataLoader:
        config = self.config
        # The epoch's randomness depends on (seed, epoch, rank) only, so a resumed run
        # draws exactly what an uninterrupted one does, whatever happened in between.
        _seed_everything(_derived_seed(config.seed, self.epoch, self.rank))
        sampler = DistributedSampler(self.train_set, num_replicas=self.world_size, rank=self.rank,
                                     shuffle=True, seed=config.seed, drop_last=True)
        sampler.set_epoch(self.epoch)
        return DataLoader(
            self.train_set, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
            collate_fn=TokenizingCollate(self.tokenizer), pin_memory=self.device.type == "cuda",
            drop_last=True, worker_init_fn=_seed_numpy_in_worker,
            generator=torch.Generator().manual_seed(_derived_seed(config.seed, self.epoch, self.rank, 1)),
        )

    def _micro_step(self, batch: tuple[torch.Tensor, ...], sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the four losses, detached."""
        batch = tuple(tensor.to(self.device, non_blocking=True) for tensor in batch)
        no_sync = not sync and hasattr(self.step_module, "no_sync")
        with self.step_module.no_sync() if no_sync else contextlib.nullcontext():
            autocast = (torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
                        if self.autocast_dtype else contextlib.nullcontext())
            with autocast:
                losses = self.step_module(*batch)
            self.scaler.scale(losses[0] / self.config.grad_accum_steps).backward()
        return torch.stack([value.detach().double() for value in losses])

    def _optimizer_step(self) -> None:
        if self.config.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._trainable(), self.config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.loss.clamp_temperature_()

    def _trainable(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _nonfinite_part(self, step_loss: torch.Tensor) -> str | None:
        """What of this step is NaN or infinite (the loss, or a gradient), or None. One device
        sync per optimizer step. Under fp16 the gradient scaler handles overflowing gradients
        itself (it skips those steps and lowers the scale), so only the loss is checked there."""
        checked = [step_loss]
        grads = [p.grad for p in self._trainable() if p.grad is not None]
        if grads and self.config.precision != "fp16":
            checked.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).to(step_loss))
        if bool(torch.isfinite(torch.stack(checked)).all()):
            return None
        if not bool(torch.isfinite(step_loss)):
            return "the loss"
        names = {id(p): n for n, p in self.model.named_parameters()}
        names.update({id(p): f"loss.{n}" for n, p in self.loss.named_parameters()})
        bad = [names.get(id(p), "?") for p in self._trainable()
               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        return f"the gradient of {len(bad)} tensor(s), e.g. {bad[:3]}"

    def _diverged(self, part: str, step: int) -> None:
        """Apply the non-finite policy to optimizer step ``step`` (1-based, of the run)."""
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        if config.nonfinite == "skip" and self.skipped_steps <= config.max_skipped_steps:
            _log(f"[harma] warning: step {step} (epoch {self.epoch + 1}): {part} is not finite; step skipped "
                 f"({self.skipped_steps} of at most {config.max_skipped_steps})")
            self.scheduler.step()
            return
        limit = (f" after {config.max_skipped_steps} skipped step(s) (max_skipped_steps)"
                 if config.nonfinite == "skip" else "")
        raise NonFiniteError(
            f"step {step} (epoch {self.epoch + 1}): {part} is not finite (NaN or inf){limit}. The run "
            f"diverged: lower the learning rate (lr={config.lr:g}), clip gradients (max_grad_norm="
            f"{config.max_grad_norm}), or train in fp32 (precision={config.precision}); nonfinite=skip "
            f"skips such steps. The files in '{self.output_dir}' hold the last finished epoch "
            f"({self.epoch}); --resume continues from there."
        )

    def train_epoch(self) -> EpochStats:
        """Train one epoch (``steps_per_epoch`` optimizer steps) and advance the counters.

        Raises:
            NonFiniteError: a step's loss or gradient is NaN or infinite and the policy
                (``nonfinite``, ``max_skipped_steps``) says stop.
        """
        config, steps, accum = self.config, self.steps_per_epoch, self.config.grad_accum_steps
        # Summed on the device: reading a loss back every micro-step would stall a GPU.
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        step_totals = torch.zeros_like(totals)
        bar = tqdm(total=steps, desc=f"epoch {self.epoch + 1}/{config.epochs}", leave=False,
                   disable=not (config.progress and is_main_process()), dynamic_ncols=True)
        self.step_module.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro, skipped = 0, 0
        for batch in self._batches():
            if micro >= steps * accum:
                break
            final = (micro + 1) % accum == 0
            step_totals += self._micro_step(batch, sync=final)
            micro += 1
            if not final:
                continue
            part = self._nonfinite_part(step_totals[0])
            if part is None:
                self._optimizer_step()
                totals += step_totals
            else:
                self._diverged(part, self.global_step + micro // accum)
                skipped += 1
            step_totals.zero_()
            bar.update(1)
            if not bar.disable and (bar.n % 10 == 0 or bar.n == steps):
                bar.set_postfix(loss=f"{float(totals[0]) / max(micro - skipped * accum, 1):.4f}",
                                lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        bar.close()
        if micro < steps * accum:
            raise RuntimeError(f"the train loader gave {micro} micro-batches, expected {steps * accum}")
        counted = max(micro - skipped * accum, 1)
        means = dict(zip(("loss", "contrastive", "triplet", "affiliation"), (totals / counted).tolist(), strict=True))
        if config.affiliation_weight == 0:
            del means["affiliation"]
        self.epoch += 1
        self.global_step += steps
        return EpochStats(losses=means, lr=self.optimizer.param_groups[0]["lr"], steps=steps, skipped_steps=skipped)

    def _batches(self):
        """The epoch's batches; an unreadable image is reported without the worker's traceback."""
        try:
            yield from self._loader()
        except ImageReadError as error:
            raise ImageReadError.without_worker_traceback(error) from None

    # --------------------------------------------------------------------------- evaluate

    def evaluate(self, dataset: Any) -> dict[str, float]:
        """R@1/5/10 both ways and mean recall (percent) of the model on an evaluation dataset
        (sharded over ranks under ``torch.distributed``)."""
        config = self.config
        evaluator = RetrievalEvaluator.from_dataset(
            dataset, self.tokenizer, batch_size=config.eval_batch_size, num_workers=config.num_workers,
            device=self.device, autocast_dtype=self.autocast_dtype, progress=config.progress,
        )
        try:
            return evaluator.evaluate(self.model)
        except ImageReadError as error:
            raise ImageReadError.without_worker_traceback(error) from None

    def evaluate_monitored_sets(self) -> dict[str, Any]:
        """The zero-shot and extra retrieval sets of the run (`harma.training.monitor`) with
        the model as it is: ``{"zero_shot": {...}, "extra_retrieval": {...}}``, each only when
        the run names such sets."""
        try:
            return self.monitors.evaluate(self.model, self.evaluate)
        except ImageReadError as error:
            raise ImageReadError.without_worker_traceback(error) from None

    def evaluate_before_training(self) -> None:
        """Evaluate the untrained model and log it as epoch 0: the validation split (with
        ``eval_before_training``) and the monitored sets."""
        line: dict[str, Any] = {"epoch": 0, "step": 0}
        if self.config.eval_before_training and self.val_set is not None:
            line["val"] = self.evaluate(self.val_set)
        line.update(self.evaluate_monitored_sets())
        line["time_s"] = 0.0
        self.history.append(line)
        parts = ([f"val {short_metrics(line['val'])}"] if "val" in line else []) + [short_monitors(line)]
        _log("[harma] epoch 0 (untrained) " + " | ".join(part for part in parts if part))
        if is_main_process():
            write_metrics(self.output_dir / METRICS_NAME, self.history)

    def _validate(self, line: dict[str, Any]) -> bool:
        """Validate when the schedule says so; record the result in ``line``. Returns whether
        this epoch becomes the best one."""
        config = self.config
        scheduled = self.epoch % config.eval_every == 0 or self.epoch == config.epochs
        if self.val_set is not None and scheduled:
            line["val"] = self.evaluate(self.val_set)
            improved = line["val"]["mean_recall"] > self.best_metric
            if improved:
                self.best_metric = line["val"]["mean_recall"]
        else:
            # Without a validation split the last epoch is kept.
            improved = self.val_set is None and self.epoch == config.epochs
        if improved:
            self.best_epoch = self.epoch
        if scheduled:  # after the choice above: the monitored sets never choose anything
            line.update(self.evaluate_monitored_sets())
        return improved

    # ------------------------------------------------------------------------------- save

    def _resume_state(self, pending_validation: bool) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "config": self.config.to_dict(),
            "epoch": self.epoch, "global_step": self.global_step, "world_size": self.world_size,
            "best_metric": float(self.best_metric) if self.best_epoch is not None else 0.0,
            "best_epoch": self.best_epoch, "history": self.history, "skipped_steps": self.skipped_steps,
            "pending_validation": pending_validation,
            "trainable": trainable_state(self.model), "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_state(),
        }

    def _check_finite_weights(self) -> None:
        tensors = {**trainable_state(self.model), **{f"loss.{k}": v for k, v in self.loss.state_dict().items()}}
        names = nonfinite_tensors(tensors)
        if names:
            raise NonFiniteError(
                f"after epoch {self.epoch} (step {self.global_step}) {len(names)} trained tensor(s) are not "
                f"finite (NaN or inf), e.g. {names[:3]}; nothing of this epoch is saved. The run diverged: "
                f"lower the learning rate (lr={self.config.lr:g}) or clip gradients (max_grad_norm)."
            )

    def save_state(self, improved: bool = False, *, weights: bool = True, pending_validation: bool = False) -> None:
        """Write the run's files (main process), then wait for every rank.

        Args:
            improved: this epoch is the new best: copy ``last.safetensors`` to ``best.safetensors``.
            weights: write ``last.safetensors`` (False when it is already on disk for this epoch).
            pending_validation: the epoch's validation has not run yet; a resumed run runs it first.

        Raises:
            NonFiniteError: a trained tensor is NaN or infinite; nothing is written.
        """
        if is_main_process():
            if weights:
                self._check_finite_weights()
                temperature = float(self.loss.effective_temperature().detach())
                extra = {"epoch": str(self.epoch), "step": str(self.global_step)}
                save_trained_weights(self.model, self.output_dir / LAST_WEIGHTS_NAME, self.config, temperature,
                                     extra)
            if improved:
                copy_atomically(self.output_dir / LAST_WEIGHTS_NAME, self.output_dir / BEST_WEIGHTS_NAME)
            save_state(self.output_dir / STATE_NAME, self._resume_state(pending_validation))
            write_metrics(self.output_dir / METRICS_NAME, self.history)
            if self.draw_curves:
                self.draw_curves = _plot_curves(self.output_dir)
        barrier()

    # ------------------------------------------------------------------------------- loop

    def run_epoch(self) -> None:
        """`train_epoch`, `save_state`, then the validation and its `save_state`, and a log line.

        The epoch's checkpoint is written before validation, which reads new input (the
        validation images) and can fail: a crash there loses no training.
        """
        epoch_start = time.time()
        stats = self.train_epoch()
        line: dict[str, Any] = {
            "epoch": self.epoch, "step": self.global_step, "train": stats.losses, "lr": stats.lr,
            "temperature": float(self.loss.effective_temperature().detach()),
        }
        if stats.skipped_steps:
            line["skipped_steps"] = stats.skipped_steps
        line["time_s"] = round(time.time() - epoch_start, 3)
        self.history.append(line)
        self.save_state(pending_validation=True)
        self.complete_epoch()

    def complete_epoch(self) -> None:
        """Validate the epoch just saved (when the schedule says so), mark the best one, save."""
        line = self.history[-1]
        improved = self._validate(line)
        line["best_epoch"] = self.best_epoch
        self.save_state(improved, weights=False)
        summary = (f"[harma] epoch {self.epoch}/{self.config.epochs} step {self.global_step} "
                   f"loss {line['train']['loss']:.4f} lr {line['lr']:.2e}")
        if "val" in line:
            summary += f" | val {short_metrics(line['val'])}" + (" (best)" if improved else "")
        if short_monitors(line):
            summary += f" | {short_monitors(line)}"
        _log(summary + f" | {line['time_s']:.1f}s")


    def _results(self) -> dict[str, Any]:
        config = self.config
        return {
            "finished": self.epoch >= config.epochs,
            "method": config.method,
            "model": config.model,
            "pretrained": config.pretrained,
            "epochs": self.epoch,
            "global_step": self.global_step,
            "world_size": self.world_size,
            "best_epoch": self.best_epoch,
            "best_val": next((line.get("val") for line in self.history if line["epoch"] == self.best_epoch), None),
            "trainable_parameters": self.trainable_count,
            "total_parameters": self.total_count,
            "temperature": float(self.loss.effective_temperature().detach()),
            "skipped_steps": self.skipped_steps,
            "output_dir": str(self.output_dir),
            "data": {name: dataset.describe() for name, dataset in
                     (("train", self.train_set), ("val", self.val_set), ("test", self.test_set)) if dataset is not None},
            **monitor_results(self.history, self.best_epoch, self.monitors.set_details()),
        }

    def finish(self) -> dict[str, Any]:
        """Test the best checkpoint (chosen on validation, never test) and write ``results.json``.

        Returns:
            The results; for a run stopped early, without the test and with ``"finished"`` set to False.
        """
        results = self._results()
        if not results["finished"]:
            _log(f"[harma] stopped after epoch {self.epoch}; continue with --resume {self.output_dir}")
            return results
        if self.test_set is not None and self.best_epoch is not None:
            load_trained_weights(self.model, self.output_dir / BEST_WEIGHTS_NAME)
            results["test"] = self.evaluate(self.test_set)
            results["test_checkpoint"] = BEST_WEIGHTS_NAME
            _log(f"[harma] test (best epoch {self.best_epoch} by validation) {short_metrics(results['test'])}")
        results["time_s"] = round(time.time() - self.start_time, 3)
        if is_main_process():
            write_json(self.output_dir / RESULTS_NAME, results)
        barrier()
        return results

    def run(self, state: Mapping[str, Any] | None = None, stop_after_epoch: int | None = None) -> dict[str, Any]:
        """Every step of the run, from `setup` to `finish`; ``state`` resumes a run."""
        if state is not None:
            self.check_resumable(state)
        self.setup(fresh=state is None)
        if state is not None:
            self.restore(state)
        elif (self.config.eval_before_training and self.val_set is not None) or self.monitors:
            self.evaluate_before_training()
        stop_at = self.config.epochs if stop_after_epoch is None else min(self.config.epochs, stop_after_epoch)
        while self.epoch < stop_at:
            self.run_epoch()
        return self.finish()


def train(
    config: TrainConfig,
    *,
    resume: bool | str | os.PathLike = False,
    overwrite: bool = False,
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Run a training recipe; under ``torchrun`` every process calls this.

    Each epoch: train, validate (every ``eval_every`` epochs; also the zero-shot and extra
    retrieval sets the config names, which are evaluated before training too and never choose
    anything), save ``last.safetensors`` and
    ``last_state.pt``, copy to ``best.safetensors`` when validation mean recall improves, append
    to ``metrics.jsonl`` and redraw ``training_curves.png`` from it (skipped, with one warning,
    without matplotlib). At the end the best checkpoint (by validation, never test) is
    evaluated on the test split and ``results.json`` is written.

    Args:
        config: the recipe.
        resume: True to continue the run in ``config.output_dir``, or a run folder /
            ``last_state.pt`` path. The recipe must be the one the run was started with (only
            the fields in ``RESUMABLE_CHANGES`` may differ); the finished run then equals an
            uninterrupted one.
        overwrite: start afresh in a non-empty ``output_dir``, replacing its run files.
        stop_after_epoch: end after this many epochs as if interrupted (a job with a time
            limit); ``resume`` continues it.

    Returns:
        The results dict, also written to ``results.json``, with ``"test"`` (test metrics of the
        best checkpoint), ``"best_val"``, ``"best_epoch"``, parameter counts and timings, and
        ``"zero_shot"`` / ``"extra_retrieval"`` for the sets the run follows
        (`harma.training.monitor.monitor_results`). For a stopped run, the state after the last
        epoch, with ``"finished"`` set to False.

    A run folder that holds no checkpoint yet (the run failed before its first epoch ended)
    can be started again with the same call, with or without ``resume``; temporary files that an
    interrupted write left there are removed. ``resume`` of a folder that does not exist (the
    run was killed before it created it) starts the run, saying so.

    Raises:
        FileExistsError: a fresh run in a non-empty ``output_dir``.
        FileNotFoundError: missing annotation files, images or weights (named).
        ValueError: an invalid recipe, resuming with a different one, or an unreadable image
            (`harma.training.data.ImageReadError`, naming the file and its annotation entry).
        NonFiniteError: the run diverged (see ``TrainConfig.nonfinite``); the files of the last
            finished epoch stay as they were.
    """
    if stop_after_epoch is not None and (
        isinstance(stop_after_epoch, bool) or not isinstance(stop_after_epoch, int) or stop_after_epoch < 1
    ):
        raise ValueError(f"stop_after_epoch must be an integer >= 1, got {stop_after_epoch!r}")
    output_dir = Path(config.output_dir)
    state: dict[str, Any] | None = None
    if resume:
        path = state_path(resume, output_dir)
        output_dir = path.parent
        config = config.replace(output_dir=str(output_dir))
        if not path.is_file() and not output_dir.exists():
            # Killed before its folder existed (a requeue script passes --resume every time).
            _log(f"[harma] '{output_dir}' does not exist yet: nothing to resume, starting the run from "
                 f"the beginning")
            resume = False
        elif not path.is_file() and output_dir.is_dir() and holds_no_checkpoint(output_dir):
            # The run stopped before its first checkpoint: there is nothing to lose by starting it.
            _log(f"[harma] '{output_dir}' has no checkpoint yet: starting the run from the beginning")
            resume = False
        else:
            state = read_state(path, config)
    if config.threads:
        torch.set_num_threads(config.threads)
    initialised_here = not is_distributed()
    # torchrun's LOCAL_RANK picks the GPU; the backend follows the device, so a CPU run on a
    # machine with GPUs still uses gloo.
    device = _resolve_device(config, int(os.environ.get("LOCAL_RANK", 0)))
    init_distributed_from_env("nccl" if device.type == "cuda" else "gloo")
    try:
        return Trainer(config, device, overwrite=overwrite).run(state, stop_after_epoch)
    finally:
        if initialised_here:
            cleanup_distributed()
