"""The training run around any trainer: lock, fresh-or-resume, data stream, logs, evaluation, saves, stops.

Kept apart from the trainer (``ugatit.UGATIT``: the networks, the step, the state) as StyleGAN2-ADA
keeps ``training_loop.py`` apart from its loss: either can change without reading the other. The
loop asks the trainer only for what :class:`Trainer` lists.

The run folder is locked for the run's lifetime (one training process per folder). Everything the
run will need (metric network, preview images, disk space for a checkpoint) is checked before the
first step. A stop signal saves the step it stopped at and exits with a status a job script can
read; a loss that becomes NaN stops the run keeping the last good checkpoint; any other error
after the first step first writes a checkpoint (a full disk is not written to again).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

import checkpoints
import dataset as data
import distributed
import memory_fit
import run_folder
import signals
from config import Config
from errors import DiskFull, OutOfMemory, Stopped, TrainingDiverged, WorkerDied
from model import DIRECTIONS, Direction, Translator
from run_folder import RunFiles
from utils import human_size

GIB = 1024 ** 3

# fp16: steps in a row whose scaled gradients may overflow (the GradScaler skips them and halves its
# scale) before the run counts as diverged; 2^16 → 2^-16 takes 32 halvings.
MAX_SKIPPED_STEPS = 64


class Trainer(Protocol):
    """What the loop needs of a trainer (``ugatit.UGATIT`` is one; the loop's test uses a tiny one)."""

    dist: distributed.DistributedContext
    device: torch.device
    step: int
    has_ema: bool
    skips_nonfinite_steps: bool   # fp16: the GradScaler skips steps whose losses are not finite

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]: ...
    def restore_last_completed_step(self) -> bool: ...
    def checkpoint_nbytes(self) -> int: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> list[str]: ...
    def translator(self, use_ema: bool = True) -> Translator: ...
    def visual_columns(self, real: torch.Tensor, direction: Direction, use_ema: bool = True) -> list: ...
    def scalars(self, step: int) -> dict[str, float]: ...


class TrainingRun:
    """One training run of ``trainer`` as ``config`` describes it; :meth:`run` does it all."""

    def __init__(self, trainer: Trainer, config: Config, *, evaluation: object | None = None,
                 estimate: memory_fit.Estimator | None = None) -> None:
        self.trainer = trainer
        self.config = config
        self.dist = trainer.dist
        self.dataset_root = data.resolve_dataset_root(config.run.dataset)
        self.files = RunFiles(config.run.result_dir, config.run.dataset_name)
        self.best_metric = math.inf
        self.data_files: dict | None = None   # the training file lists (see dataset.build_train_stream)
        self.last_saved: Path | None = None
        self._evaluation = evaluation          # FID/KID evaluator (built at start-up when None and asked for)
        self.estimate = estimate or memory_estimator(type(trainer))   # a config's peak GPU memory (None: unknown)

    # -- the run -----------------------------------------------------------------------------------

    def run(self) -> None:
        """Train from scratch or resume; periodic logs, previews, metrics and checkpoints."""
        with self.files.lock() if self.dist.is_main else contextlib.nullcontext():
            self._run()

    def _run(self) -> None:
        iterations = self.config.iterations
        for path in self.files.remove_leftovers() if self.dist.is_main else []:
            self.log(f'removed {path}, a partial checkpoint of a process that died while writing it')
        start = self._start_step()
        if start > iterations:
            self.log(f'already trained for {iterations} iterations; nothing to do')
            return
        self._check_disk_space()
        self._check_memory()
        evaluation = self._build_evaluation()
        monitor = self._build_monitor()
        if self.dist.is_main:
            self.files.run_dir.mkdir(parents=True, exist_ok=True)
            self.files.config_path.write_text(json.dumps(self.recorded_config(), indent=2))
        self.stream = self._train_stream(start)
        stop = signals.GracefulStop()
        try:
            self._loop(start, monitor, evaluation, stop)
        except (TrainingDiverged, KeyboardInterrupt, Stopped, DiskFull, WorkerDied):
            raise
        except torch.OutOfMemoryError:
            if self.trainer.step >= start:
                self._save_after_error()
            raise self._out_of_memory() from None
        except Exception:
            if self.trainer.step >= start:
                self._save_after_error()
            raise
        finally:
            stop.restore()
            self.stream.close()
            if monitor is not None:
                monitor.close()
        if self.last_saved is not None:
            self.log(f'final checkpoint: {self.last_saved}')

    def _loop(self, start: int, monitor, evaluation, stop: signals.GracefulStop) -> None:
        run = self.config.run
        iterations = self.config.iterations
        bar = tqdm(range(start, iterations + 1), initial=start - 1, total=iterations,
                   disable=not self.dist.is_main, dynamic_ncols=True, desc='train')
        meter = LossMeter(skip_nonfinite=self.trainer.skips_nonfinite_steps)
        for step in bar:
            meter.add(self._train_step(step))
            log_step = step % run.log_freq == 0 or step == iterations
            signum = self._agreed_stop(stop, log_step)
            if log_step or signum:
                self._flush(meter, monitor, bar, step)
            if monitor is not None and step % run.print_freq == 0:
                monitor.previews(step, self.trainer.visual_columns, ema=self.trainer.has_ema)
            if run.metric_freq and step % run.metric_freq == 0:
                self._evaluate(evaluation, monitor, step)
            self._periodic_saves(step, meter, monitor, bar)
            if signum:
                if self.last_saved != self.files.checkpoint_path(step):   # not already saved as a periodic one
                    self.save(self.files.checkpoint_path(step))
                raise Stopped(f'stopped by signal at step {step}; {signal.Signals(signum).name}: saved '
                              f'{self.last_saved}, resume with --resume True', signals.stop_exit_code(signum))

    # -- start-up ----------------------------------------------------------------------------------

    def _start_step(self) -> int:
        """1 for a fresh run (never mixed with an old one), step + 1 after resuming."""
        if self.config.run.resume:
            found = run_folder.checkpoint_to_resume(self.files, self.dataset_root, self.config.arch)
            if found is None:
                self.log(f'no checkpoint in {self.files.model_dir}: starting from scratch')
                return 1
            self.load_state_dict(found.state)
            self.trainer.step = found.step
            self.log(f'resumed from {found.path} at step {found.step}')
            return found.step + 1
        if self.dist.is_main:
            archive = self.files.clear_for_fresh_run(self.config.run.overwrite)
            if archive is not None:
                self.log(f'--overwrite: moved the earlier run to {archive}')
        self.dist.barrier()
        return 1

    def _check_disk_space(self) -> None:
        """Refuse to start when not even one checkpoint fits on the disk; warn when two do not."""
        if not self.dist.is_main:
            return
        needed = self.trainer.checkpoint_nbytes()
        free = checkpoints.free_bytes(self.files.model_dir)
        where = f'{self.files.model_dir}: {human_size(free)} free, a checkpoint needs {human_size(needed)}'
        if free < needed:
            raise DiskFull(f'no room for a single checkpoint in {where}; free some space or use another --result_dir')
        if free < 2 * needed:
            self.log(f'warning: room for only one more checkpoint in {where}')

    def _check_memory(self) -> None:
        """On CUDA: one line comparing the config's estimated peak with what the card leaves this process;
        a config that does not fit stops here, naming the flags that fit (--memory_check False skips)."""
        device = self.trainer.device
        if device.type != 'cuda' or self.estimate is None or not self.config.performance.memory_check:
            return
        fit = memory_fit.Fit(self.estimate(self.config).peak_bytes, *card_memory(device))
        self.log(fit.line(str(device)))
        if not fit.fits:
            raise OutOfMemory(f'{fit.line(str(device))}; {memory_fit.advice(self.config, self.estimate, fit.usable)} '
                              f'(or --memory_check False to try anyway)')

    def _out_of_memory(self) -> OutOfMemory:
        """A CUDA out-of-memory error as one line: what the config needs, what the card has, what fits."""
        kept = f'the last checkpoint is kept ({self.last_saved or "none yet"}); resume with --resume True'
        device = self.trainer.device
        if device.type != 'cuda' or self.estimate is None:
            return OutOfMemory(f'out of memory at step {self.trainer.step + 1}; {kept}')
        fit = memory_fit.Fit(self.estimate(self.config).peak_bytes, *card_memory(device))
        return OutOfMemory(f'CUDA out of memory at step {self.trainer.step + 1}: {fit.line(str(device))}; '
                           f'{memory_fit.advice(self.config, self.estimate, fit.usable)}; {kept}')

    def _build_monitor(self):
        if not self.dist.is_main:
            return None
        from monitor import TrainingMonitor
        return TrainingMonitor(self.files, self.dataset_root, self.config.arch.img_size)

    def _build_evaluation(self):
        """The FID/KID evaluator when --metric_freq is set (built now: start-up fails, not step 10k)."""
        run = self.config.run
        if not run.metric_freq or not self.dist.is_main:
            return None
        if self._evaluation is not None:
            return self._evaluation
        from metrics.training import TranslationMetrics
        groups = self.config.few_shot.groups
        return TranslationMetrics(self.dataset_root, self.config.arch.img_size, run.inception_weights,
                                  self.trainer.device, batch_size=run.fid_batch,
                                  cache_dir=self.files.run_dir / 'metric_cache',
                                  groups=list(groups) if groups else None, num_workers=run.num_workers)

    def _train_stream(self, start: int) -> data.TrainStream:
        """The batches from step ``start`` on; a resumed run keeps the file lists it started with
        (a file deleted since is then replaced like an unreadable one, and the draws stay exact)."""
        options = self.config.data
        listing = {'groups': options.groups, 'paired': options.paired}
        started = self.data_files
        same_listing = started is not None and all(started.get(k) == v for k, v in listing.items())
        stream = data.train_stream(self.dataset_root, options, start, self.dist,
                                   pin_memory=self.trainer.device.type == 'cuda',
                                   files=started['files'] if same_listing else None)
        self.data_files = {**listing, 'files': stream.files}
        return stream

    # -- during the run ------------------------------------------------------------------------------

    def _train_step(self, step: int) -> dict[str, torch.Tensor]:
        """The step on the stream's next batch. A data worker that dies (the kernel's OOM killer picks
        them) is replaced at once: the undone step runs again on a fresh loader started at this step,
        whose batches are those of the old one (a function of seed and step). Past the step's
        optimizer updates it cannot be undone: the run ends in one line (:class:`WorkerDied`)."""
        for attempt in (1, 2):
            try:
                return self.trainer.train_step(next(self.stream), step)
            except RuntimeError as exc:
                if not data.is_worker_death(exc):
                    raise
                first_line = str(exc).strip().splitlines()[0]
                if not self.trainer.restore_last_completed_step():
                    raise WorkerDied(f'{first_line} inside step {step}, after its optimizer updates: the last good '
                                     f'checkpoint is kept; resume with --resume True') from None
                if attempt == 2:
                    self._save_after_error()
                    raise WorkerDied(f'{first_line} again at step {step}, on a fresh data loader; resume with '
                                     f'--resume True') from None
                self.log(f'warning: {first_line}; a fresh data loader continues at step {step} (same batches)')
                self.stream.close()
                self.stream = self._train_stream(step)
        raise AssertionError('unreachable')

    def _agreed_stop(self, stop: signals.GracefulStop, log_step: bool) -> int:
        """The stop signal (0: go on). One process stops on the step after the signal. Under torchrun
        the ranks must stop at the same step (a rank that trains on alone waits forever in its
        all-reduce), so they agree at logging steps, which already sync with the host."""
        if not self.dist.enabled:
            return stop.signum or 0
        if not log_step:
            return 0
        return self.dist.agree_max(stop.signum or 0, self.trainer.device)

    def _flush(self, meter: LossMeter, monitor, bar, step: int) -> None:
        """Log the interval's loss means; stop on a loss that is not finite (the NaN guard)."""
        means = meter.flush()
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        kept = f'training stopped and the last good checkpoint kept ({self.last_saved or "none yet"})'
        if bad:
            raise TrainingDiverged(f'{bad[0]} became {means[bad[0]]} by step {step}; {kept}. Try a lower --lr or '
                                   f'--amp off')
        if meter.nonfinite_streak > MAX_SKIPPED_STEPS:
            raise TrainingDiverged(f'the losses were not finite for the last {meter.nonfinite_streak} steps (fp16: the '
                                   f'GradScaler skipped them all) by step {step}; {kept}. Try a lower --lr or --amp '
                                   f'bf16')
        if monitor is not None and means:
            monitor.scalars(step, {**means, **self.trainer.scalars(step)})
            bar.set_postfix({'D': f"{means.get('D/total', 0):.3f}", 'G': f"{means.get('G/total', 0):.3f}"})

    def _evaluate(self, evaluation, monitor, step: int) -> None:
        """FID/KID of the raw and EMA generators (rank 0), logged; the checkpoint with the best mean FID
        of the generators inference uses is kept as the best one."""
        if self.dist.is_main:
            has_ema = self.trainer.has_ema
            variants = (False, True) if has_ema else (False,)
            results, record = evaluation.evaluate({'_ema' if e else '': self.trainer.translator(e) for e in variants})
            if monitor is not None:
                monitor.metrics(step, results, record)
            suffix = '_ema' if has_ema else ''
            score = sum(results[f'FID/{d.name}{suffix}'] for d in DIRECTIONS) / len(DIRECTIONS)
            if score < self.best_metric:
                self.best_metric = score
                self.save(self.files.best_path)
                self.log(f'step {step}: new best mean FID {score:.3f} -> {self.files.best_path}')
        self.dist.barrier()

    def _periodic_saves(self, step: int, meter: LossMeter, monitor, bar) -> None:
        run = self.config.run
        targets = []
        if step % run.save_freq == 0 or step == self.config.iterations:
            targets.append(self.files.checkpoint_path(step))
        if run.latest_freq and step % run.latest_freq == 0:
            targets.append(self.files.latest_path)
        if not targets:
            return
        self._flush(meter, monitor, bar, step)   # never write weights after a NaN
        for path in reversed(targets):   # the periodic checkpoint last: it is the one named at the end
            self.save(path)
        if self.dist.is_main:
            for path in self.files.prune(run.keep_checkpoints):
                self.log(f'deleted {path.name} (--keep_checkpoints {run.keep_checkpoints})')

    def _save_after_error(self) -> None:
        """A checkpoint named step N holds exactly step N: the trainer undoes what the failed step
        changed, or, when an optimizer had already updated weights, the last good checkpoint stays
        the newest and nothing is written."""
        failed, done = self.trainer.step + 1, self.trainer.step
        if not self.trainer.restore_last_completed_step():
            self.log(f'error inside step {failed} after its optimizer updates; the state of step {done} cannot be '
                     f'restored exactly, so the last good checkpoint ({self.last_saved or "none of this process"}) '
                     f'stays the newest: fix the cause and resume with --resume True')
            return
        target = self.files.checkpoint_path(done)
        if self.last_saved == target:
            self.log(f'error inside step {failed}; step {done} is saved in {target}: fix the cause and resume with '
                     f'--resume True')
            return
        try:
            self.save(target)
        except DiskFull as full:
            self.log(f'could not save after the error: {full}')
            return
        self.log(f'error inside step {failed}; saved step {done} to {self.last_saved}: fix the cause and resume '
                 f'with --resume True')

    # -- the checkpoint: the trainer's state plus the run's own ----------------------------------------

    def recorded_config(self) -> dict:
        """The resolved flags and the dataset folder, as config.json and every checkpoint record them."""
        return {**self.config.to_dict(), 'dataset_root': str(self.dataset_root)}

    def state_dict(self) -> dict:
        return {**self.trainer.state_dict(), 'best_metric': self.best_metric, 'data_files': self.data_files,
                'config': self.recorded_config()}

    def load_state_dict(self, state: Mapping) -> None:
        for note in self.trainer.load_state_dict(dict(state)):
            self.log(f'note: {note}')
        self.best_metric = state.get('best_metric', math.inf)
        self.data_files = state.get('data_files')

    def save(self, path: Path) -> None:
        """Atomically write the whole training state (rank 0 only)."""
        if self.dist.is_main:
            checkpoints.atomic_save(self.state_dict(), path)
            self.last_saved = path

    def log(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message, file=sys.stderr)


def train(trainer: Trainer, config: Config) -> None:
    """Run the training ``config`` describes with ``trainer``."""
    TrainingRun(trainer, config).run()


def memory_estimator(trainer_class: type) -> memory_fit.Estimator | None:
    """A config's peak memory for trainers memory.py can measure (``memory_training()``), else None.
    Each config is estimated once (the full model takes seconds; start-up and an OOM ask again)."""
    if not hasattr(trainer_class, 'memory_training'):
        return None
    import memory
    reports: dict[str, memory.MemoryReport] = {}

    def estimate(config: Config) -> memory.MemoryReport:
        key = json.dumps(config.values, sort_keys=True, default=str)
        if key not in reports:
            reports[key] = memory.estimate(config, lambda c: trainer_class(c).memory_training())
        return reports[key]
    return estimate


def settle_recompute(config: Config, estimate: memory_fit.Estimator | None) -> Config:
    """``--recompute auto`` (left so by validation on CUDA only): on exactly when the config would not fit
    the card without it. The recomputation changes no number, only memory and time, so the choice may
    differ between machines and resumes; it is said in one line and recorded in the run's config."""
    if config.performance.recompute != 'auto':
        return config
    if estimate is None:
        return memory_fit.with_flags(config, {'recompute': False})
    device = torch.device(config.performance.device)
    if device.index is None:   # torchrun: this process's card (as distributed.DistributedContext picks it)
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
    usable, total = card_memory(device)
    needed = estimate(memory_fit.with_flags(config, {'recompute': False})).peak_bytes
    recompute = not memory_fit.Fit(needed, usable, total).fits
    if int(os.environ.get('RANK', '0')) == 0:
        print(f'memory: --recompute auto: {"on" if recompute else "off"} (without it the config needs about '
              f'{needed / GIB:.2f} GiB, {device} has {usable / GIB:.2f} GiB for it)',
              file=sys.stderr)
    return memory_fit.with_flags(config, {'recompute': recompute})


def card_memory(device: torch.device) -> tuple[int, int]:
    """(bytes this process can use, the card's total): the free memory plus what its allocator holds."""
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device), total


class LossMeter:
    """Running sums of loss tensors kept on the device; one host sync per flush.

    Each key is averaged over the steps that logged it (with --n_critic > 1 the G losses exist
    only on generator steps). With ``skip_nonfinite`` (fp16: the GradScaler skips a step whose
    scaled gradients overflowed, so its losses may be inf/nan without harm to the weights)
    non-finite values are left out of the means, and ``nonfinite_streak`` counts the steps in a row,
    up to the last flush, whose losses were not all finite.
    """

    def __init__(self, skip_nonfinite: bool = False) -> None:
        self.skip_nonfinite = skip_nonfinite
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor | int] = {}
        self._streak: torch.Tensor | None = None
        self.nonfinite_streak = 0

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        all_finite = None
        for key, value in logs.items():
            value = value.detach().float()
            count: torch.Tensor | int = 1
            if self.skip_nonfinite:
                finite = torch.isfinite(value)
                value, count = torch.where(finite, value, 0.0), finite.float()
                all_finite = finite if all_finite is None else all_finite & finite
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
            self.counts[key] = self.counts.get(key, 0) + count
        if all_finite is not None:   # on the device: (streak + 1) on a bad step, 0 on a good one
            streak = self._streak if self._streak is not None else torch.zeros_like(all_finite, dtype=torch.float32)
            self._streak = (streak + 1) * (~all_finite)

    def flush(self) -> dict[str, float]:
        """Interval means as floats (a single device→host copy), then reset. Keys without a finite
        value in the interval are left out under ``skip_nonfinite``."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        parts = [self.sums[k] / self.counts[k] for k in keys]
        if self._streak is not None:
            parts.append(self._streak)
        values = torch.stack(parts).cpu().tolist()
        if self._streak is not None:
            self.nonfinite_streak = int(values.pop())
        self.sums, self.counts = {}, {}
        means = dict(zip(keys, values))
        if self.skip_nonfinite:
            means = {k: v for k, v in means.items() if math.isfinite(v)}
        return means
