"""The one training loop: accumulation, non-finite guard, logging, checkpoints, resume.

state <- resume (trainer_state.json + accelerate files) or fresh
for each optimizer step:
    micro-batches <- batches(start at step x accumulation)         (trainer's resumable stream)
    logs <- step_fn(micro-batches, ctx)                             (forward + ctx.backward, per micro-batch)
    guard: loss and gradient norms finite on every rank?            (one host sync per step)
        yes: clip, optimizer.step, LR step, after_update (EMA)      no: skip, count, stop after K in a row
    log every log_every steps (losses.jsonl, trackers, tqdm); checkpoint every checkpointing_steps
    on_step_end(step)                                               (validation, sample grids, evaluation)
    SIGTERM/SIGUSR1/SIGINT seen by any rank: checkpoint this step, exit 75 (train/core/preempt.py)
save_final()
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train.core import perf
from train.core.checkpoint import (
    LOSS_LOG_NAME,
    TrainerState,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from train.core.config import CoreConfig
from train.core.data import step_generator
from train.core.lock import RunLock
from train.core.preempt import Preempted, PreemptionHandler
from train.core.run_config import (
    apply_new_hyperparameters,
    check_resume_config,
    hyperparameters,
    record_config,
    recorded_config,
)
from utils.checkpoint import atomic_write
from utils.logging import get_main_process_logger, progress


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or gradient."""


@dataclass
class Optim:
    """One optimizer of a trainer (DinoVQ has two: generator and discriminator)."""

    name: str
    optimizer: Any  # accelerate-prepared
    lr_scheduler: Any  # accelerate-prepared
    params: list[torch.nn.Parameter]
    max_grad_norm: float = 0.0  # <= 0: no clipping (the norm is still computed for the guard)
    active: Callable[[int], bool] | None = None  # step -> does this optimizer update at this step?

    def is_active(self, step: int) -> bool:
        return self.active is None or self.active(step)


class StepContext:
    """What a step function gets besides its micro-batches."""

    def __init__(
        self,
        accelerator,
        modules: list[torch.nn.Module],
        step: int,
        num_micro: int,
        generator,
        timer: perf.StepTimer | None = None,
    ):
        self.accelerator = accelerator
        self.step = step  # steps completed before this one (0 for the first)
        self.num_micro = num_micro
        self.generator = generator  # this step's draws: depends only on (seed, step, rank)
        self._modules = modules
        self._timer = timer

    @contextlib.contextmanager
    def micro_step(self, index: int) -> Iterator[None]:
        """Wrap the forward and backward of micro-batch ``index``: DDP all-reduces on the last one only."""
        with contextlib.ExitStack() as stack:
            if index < self.num_micro - 1:
                for m in self._modules:
                    stack.enter_context(self.accelerator.no_sync(m))
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of ``loss`` averaged over the step's micro-batches."""
        with self._timer.backward() if self._timer is not None else contextlib.nullcontext():
            self.accelerator.backward(loss / self.num_micro)


@dataclass
class Task:
    """What a trainer plugs into :func:`run_training`."""

    step_fn: Callable[[list[Any], StepContext], dict[str, torch.Tensor | float]]  # logs; must hold "loss"
    batches: Callable[[int], Iterator[Any]]  # first micro-step -> endless batch iterator
    optims: list[Optim]
    train_modules: list[torch.nn.Module]  # prepared; put in train() mode, no_sync'ed while accumulating
    rng_device: str = "cpu"  # where the per-step generator lives ("cpu" or "accelerator")
    state_extra: Callable[[], dict[str, Any]] | None = None  # JSON-able trainer state (EMA counters ...)
    load_state_extra: Callable[[dict[str, Any], Path], None] | None = None  # on resume: (extra, checkpoint)
    after_update: Callable[[int], None] | None = None  # after each applied optimizer step (EMA)
    on_step_end: Callable[[int], None] | None = None  # every step, all ranks (validation, grids, eval)
    save_final: Callable[[], None] | None = None  # main process, once max_steps is reached
    # the run's full settings: recorded as <output_dir>/config.yaml, compared on resume, sent to the trackers
    tracker_config: dict[str, Any] = field(default_factory=dict)
    step_logs: tuple[str, ...] = ()  # more step-keyed JSONL logs in output_dir cut back on resume (eval logs)


def _log_line_filter(path: Path, keep_up_to: int) -> None:
    """Keep the ``losses.jsonl`` lines of steps <= ``keep_up_to`` (a resumed run rewrites what follows)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= keep_up_to
    ]
    with atomic_write(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def _flat_config(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard hparams accept only scalars/strings."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


class _Guard:
    """Skip non-finite steps, count them, stop after ``limit`` in a row (every rank decides the same)."""

    def __init__(self, accelerator, cfg: CoreConfig, state: TrainerState, logger):
        self.accelerator, self.state, self.logger = accelerator, state, logger
        self.limit = cfg.max_consecutive_nonfinite
        self.consecutive = 0
        # Under fp16 the GradScaler skips overflowing steps itself (and must see them to lower its scale).
        self.check_grads = accelerator.mixed_precision != "fp16"
        self.preemption: PreemptionHandler | None = None  # its flag rides on this all-reduce
        self.preempt_now = False  # some rank received a stop signal: every rank stops after this step

    def step_is_finite(self, loss: torch.Tensor, grad_norms: list[torch.Tensor]) -> bool:
        checks = [loss.detach().float().reshape(())]
        if self.check_grads:
            checks += [g.detach().float().reshape(()).to(loss.device) for g in grad_norms]
        bad = (~torch.isfinite(torch.stack(checks))).any().float()
        signalled = float(self.preemption is not None and self.preemption.requested)
        flags = torch.stack([bad, torch.full_like(bad, signalled)])  # a fill kernel: no host copy
        bad_sum, signalled_sum = self.accelerator.reduce(flags, reduction="sum").tolist()  # one sync per step
        self.preempt_now = self.preempt_now or signalled_sum > 0
        return bad_sum == 0

    def record(self, ok: bool, step: int, loss: torch.Tensor) -> None:
        """Count a skipped step; ``should_stop`` tells the loop to end after logging it."""
        if ok:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.state.skipped_steps += 1
        self.logger.warning(
            f"step {step}: non-finite loss or gradient (loss={float(loss):.4g}); update skipped "
            f"({self.consecutive}/{self.limit} in a row, {self.state.skipped_steps} in total)"
        )

    @property
    def should_stop(self) -> bool:
        return self.consecutive >= self.limit

    def stop(self, step: int) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"{self.consecutive} consecutive non-finite steps (last at step {step}); stopping without saving "
            "this step. The last checkpoint holds finite weights. Check the data for NaN, lower the learning "
            "rate, or train with mixed_precision=no to debug."
        )


def _apply_update(accelerator, task: Task, guard: _Guard, logs: dict[str, Any], step: int) -> bool:
    active = [o for o in task.optims if o.is_active(step)]
    norms = [
        accelerator.clip_grad_norm_(o.params, o.max_grad_norm if o.max_grad_norm > 0 else math.inf)
        for o in active
    ]
    loss = torch.as_tensor(logs["loss"], device=accelerator.device)
    ok = guard.step_is_finite(loss, norms)
    if ok:
        for o in active:
            o.optimizer.step()
            o.lr_scheduler.step()
        if norms:
            logs["grad_norm"] = norms[0]
    for o in task.optims:
        o.optimizer.zero_grad(set_to_none=True)
    guard.record(ok, step + 1, loss)
    return ok


class _Logs:
    """Step logs reduced across processes at log steps only (no per-step host sync).

    Tensors are summed where they are (a device tensor stays on the device); plain numbers are summed on the
    host and moved to the device at the log step (``torch.as_tensor(x, device=cuda)`` is a blocking copy that
    waits for the GPU queue, so doing it per step would add a sync per logged number).
    """

    def __init__(self, accelerator, path: Path):
        self.accelerator, self.path = accelerator, path
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.t0, self.step0 = time.perf_counter(), None

    def add(self, logs: dict[str, Any]) -> None:
        for k, v in logs.items():
            if torch.is_tensor(v):
                t = v.detach().float().reshape(())
            else:
                t = float(v)
                if not math.isfinite(t):
                    continue
            self.sums[k] = self.sums.get(k, 0.0) + t
            self.counts[k] = self.counts.get(k, 0) + 1

    def flush(self, step: int, extra: dict[str, float]) -> dict[str, float]:
        keys = sorted(self.sums)
        dev = self.accelerator.device
        means = [torch.as_tensor(self.sums[k], dtype=torch.float32).to(dev) / self.counts[k] for k in keys]
        values = torch.stack(means) if keys else torch.zeros(0, device=dev)
        values = self.accelerator.reduce(values, reduction="mean").tolist()
        out = {k: float(v) for k, v in zip(keys, values, strict=True)}
        now = time.perf_counter()
        if self.step0 is not None:
            out["steps_per_s"] = (step - self.step0) / max(now - self.t0, 1e-9)
        out.update(extra)
        self.sums, self.counts, self.t0, self.step0 = {}, {}, now, step
        self.accelerator.log(out, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **out}) + "\n")
        return out


def run_training(
    accelerator, cfg: CoreConfig, task: Task, start_step: int = 0, end_training: bool = True
) -> dict[str, float]:
    """Optimise until ``cfg.max_steps`` (or ``cfg.stop_at_step``); returns the last logged values.

    ``start_step``: the step a fresh (not resumed) run counts from (stage 2 continues stage 1's count).
    ``end_training=False`` leaves the trackers open (the caller logs an evaluation after training, then calls
    ``accelerator.end_training()`` itself).
    """
    logger = get_main_process_logger("train.core")
    out_dir = Path(cfg.output_dir)
    try:
        return _run(accelerator, cfg, task, start_step, logger, out_dir, end_training)
    finally:
        if accelerator.is_main_process:
            RunLock(out_dir).release()  # taken by make_accelerator


def _run(
    accelerator, cfg: CoreConfig, task: Task, start_step: int, logger, out_dir: Path, end_training: bool
) -> dict[str, float]:
    resumed_from = find_checkpoint(out_dir, cfg.resume_from_checkpoint)
    if resumed_from is None:
        state = TrainerState(step=start_step)
    else:
        old, where = recorded_config(resumed_from)
        changes = check_resume_config(old, task.tracker_config, where, cfg.allow_config_change, logger)
        new_hyperparameters = hyperparameters(task.optims)
        state = load_checkpoint(accelerator, resumed_from)
        if changes:
            apply_new_hyperparameters(task.optims, new_hyperparameters)
        if task.load_state_extra is not None:
            task.load_state_extra(state.extra, resumed_from)
    if accelerator.is_main_process:
        record_config(out_dir, task.tracker_config)
        for name in (LOSS_LOG_NAME, *task.step_logs):
            _log_line_filter(out_dir / name, state.step)
    accelerator.wait_for_everyone()
    if cfg.report_to:
        accelerator.init_trackers(cfg.project_name, config=_flat_config(task.tracker_config))
    stop = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    bar = progress(
        total=cfg.max_steps,
        initial=state.step,
        desc=cfg.project_name,
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    if state.step >= stop:
        logger.info(f"nothing to do: already at step {state.step} >= {stop}")
    perf.check_compiled(cfg)
    guard = _Guard(accelerator, cfg, state, logger)
    try:
        with PreemptionHandler() as guard.preemption:
            last = _optimise(accelerator, cfg, task, state, guard, bar, stop)
    except (NonFiniteLossError, Preempted) as err:
        accelerator.end_training()  # flush the trackers; every rank raises the same error
        if isinstance(err, Preempted):
            logger.warning(str(err))
        raise
    finally:
        bar.close()
    if state.step >= cfg.max_steps and task.save_final is not None and accelerator.is_main_process:
        task.save_final()
    elif state.step < cfg.max_steps:
        logger.info(f"stopped at step {state.step}; continue with --resume_from_checkpoint latest")
    accelerator.wait_for_everyone()
    if end_training:
        accelerator.end_training()
    return last


def _optimise(accelerator, cfg: CoreConfig, task: Task, state: TrainerState, guard, bar, stop: int):
    out_dir = Path(cfg.output_dir)
    accum = cfg.gradient_accumulation_steps
    device = accelerator.device if task.rng_device == "accelerator" else torch.device("cpu")
    params = [p for o in task.optims for p in o.params]
    logs_acc = _Logs(accelerator, out_dir / LOSS_LOG_NAME)
    # compiled code bypasses the FLOP counter (its count would be wrong), so FLOPs are counted only in eager mode
    timer = perf.StepTimer(accelerator.device, enabled=cfg.log_step_times, count_flops=not cfg.compile)
    last: dict[str, float] = {}
    data = task.batches(state.step * accum)
    for m in task.train_modules:
        m.train()
    while state.step < stop:
        with timer.data():
            micro = [next(data) for _ in range(accum)]
        gen = step_generator(cfg.seed, state.step, accelerator.process_index, device)
        ctx = StepContext(accelerator, task.train_modules, state.step, accum, gen, timer)
        with timer.step_fn(), perf.sdpa_context(cfg):
            logs = dict(task.step_fn(micro, ctx))
        if _apply_update(accelerator, task, guard, logs, state.step) and task.after_update is not None:
            task.after_update(state.step + 1)
        timer.end_step()
        state.step += 1
        bar.update(1)
        logs_acc.add(logs)
        if state.step % cfg.log_every == 0 or state.step == stop:
            extra = {"lr": task.optims[0].lr_scheduler.get_last_lr()[0], "skipped_steps": state.skipped_steps}
            extra.update({f"lr_{o.name}": o.lr_scheduler.get_last_lr()[0] for o in task.optims[1:]})
            extra.update(timer.flush())
            last = logs_acc.flush(state.step, extra)
            bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
        if guard.should_stop:
            if state.step % cfg.log_every:  # the failing step's line, for the record
                logs_acc.flush(state.step, {"skipped_steps": state.skipped_steps})
            raise guard.stop(state.step)
        every = cfg.checkpointing_steps
        if (every and state.step % every == 0) or state.step == stop or guard.preempt_now:
            if guard.preempt_now and state.step % cfg.log_every and state.step != stop:
                last = logs_acc.flush(state.step, {"skipped_steps": state.skipped_steps})
            if task.state_extra is not None:
                state.extra = task.state_extra()
            save_checkpoint(accelerator, out_dir, state, params, cfg.checkpoints_total_limit)
        if guard.preempt_now and state.step < cfg.max_steps:
            raise Preempted(state.step, guard.preemption.received or "a signal on another rank")
        if task.on_step_end is not None:
            task.on_step_end(state.step)
            for m in task.train_modules:
                m.train()
    return last
