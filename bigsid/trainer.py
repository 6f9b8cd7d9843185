"""The distillation loop: fake-score phase, generator phase, EMA, logs, samples, checkpoints.

One iteration (SiD, Algorithm 1; DMD2 for fake_steps > 1):
  A. x_gen = G(z, c) without grad; fake score learns to denoise it (its own DSM loss).
  B. fake score frozen; x_gen = G(z, c) with grad; generator loss through teacher and fake score.
Each phase draws fresh prompts and noise. Time is counted in images (nimg) of the global batch.
The loop talks to the parallel backend only through parallel.base.Backend / Trainable.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import secrets
import signal
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bigsid import checkpoint
from bigsid.compile import compile_blocks, to_channels_last
from bigsid.config import Config, save_config, to_dict
from bigsid.families import decode
from bigsid.models import Networks, build_networks
from bigsid.objectives import build_objective
from bigsid.parallel import CHECKPOINT_FORMATS, Trainable, build_backend
from bigsid.parallel.base import local_shards

log = logging.getLogger("bigsid.trainer")

# Exit status after a preemption checkpoint: EX_TEMPFAIL, "try again". slurm/ scripts requeue on it.
PREEMPTED_EXIT = 75
# The first step at which a stop condition held, on the device; NEVER: not (yet) on this rank.
NEVER = torch.iinfo(torch.int64).max
# non-finite weights of each trained network; too many skipped steps; each network's gradient norm jumping
_STOPS = ("generator", "fake_score", "skips", "generator_norm", "fake_score_norm")
# Steps of gradient norms whose median is the level a jump is measured against (train.divergence_factor). The median
# of many steps, not a running mean: the generator's norm starts near 0 (the fake score starts as the teacher) and
# rises by orders of magnitude in its first steps, which a median forgets in half a window.
NORM_WINDOW = 64
_K_DRAWS = 1  # keeps the few-step prefix draws apart from any other host stream seeded by train.seed


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite gradients step after step, or non-finite weights after an update); the
    message names the checkpoint that holds the last good state. Non-finite weights are never written."""


class Preempted(Exception):
    """Raised after a complete checkpoint was written because SIGUSR1/SIGTERM arrived."""


class PreemptionFlag:
    """SIGUSR1 (SLURM's --signal) and SIGTERM set a flag; the loop reads it at poll steps only (Trainer._poll), so
    a checkpoint is never written from inside a signal handler or half-way through an update."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.signum = None
        self.previous = {}
        for sig in signals:
            try:
                self.previous[sig] = signal.signal(sig, self._set)
            except ValueError:  # not the main thread (e.g. inside a test runner's worker thread)
                pass

    def _set(self, signum, frame):
        self.signum = signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class EMA:
    """Exponential moving average of the generator's weights, with its half-life counted in images.

    Kept as tensors in the form the backend stores the parameters (sharded where they are), never as a module
    copy: a sharded module cannot be deep-copied, and swapping weights in place works for every backend."""

    def __init__(self, trainable: Trainable):
        self.names = [n for n, p in trainable.inner.named_parameters() if p.requires_grad]
        self.shadow = [p.clone() for p in trainable.stored_params()]

    @staticmethod
    def beta(batch: int, nimg: int, halflife_nimg: float, rampup: float) -> float:
        if rampup > 0:  # EDM's ramp-up: early on, average over at most `rampup` of what has been seen
            halflife_nimg = min(halflife_nimg, nimg * rampup)
        return 0.5 ** (batch / max(halflife_nimg, 1e-8))

    @torch.no_grad()
    def update(self, trainable: Trainable, beta: float) -> None:
        torch._foreach_lerp_(local_shards(self.shadow), local_shards(trainable.stored_params()), 1.0 - beta)

    @contextlib.contextmanager
    def applied(self, trainable: Trainable):
        """Temporarily load the EMA weights into the trained network; yields the network to call, in eval mode
        (sampling, never training, runs with these weights); its weights and mode come back however the block ends."""
        params = local_shards(trainable.stored_params())
        with torch.no_grad():
            backup = [p.clone() for p in params]
            torch._foreach_copy_(params, local_shards(self.shadow))
        training = trainable.inner.training
        try:
            yield trainable.inner.eval()
        finally:
            trainable.inner.train(training)
            with torch.no_grad():
                torch._foreach_copy_(params, backup)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))


class PhaseClock:
    """Wall time and peak device memory of each phase (text encoding, fake-score phase, generator phase, EMA) of the
    steps that log, and of every checkpoint, sample grid and evaluation, for the next metrics row.

    A phase's time is honest only if the device has finished what was queued before it and finishes its own work
    inside it: on CUDA the clock drains the device at both ends of each phase it times. Those waits are what the
    timing costs, so only log steps (and checkpoints, grids and evaluations, which wait for the device anyway) pay
    them; other steps run unclocked. Peak memory is torch's allocator peak (CUDA only: the host has no such counter,
    and a made-up figure would mislead), reset at each timed phase; memory/peak_gib also covers the unclocked steps
    since the last log step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.on = False
        self.values: dict[str, float] = {}

    def start_step(self, on: bool) -> None:
        self.on = on
        if on and self.cuda:  # the peak since the last timed phase: the unclocked steps, checkpoints, evaluations
            self._peak(torch.cuda.max_memory_allocated(self.device))

    @contextlib.contextmanager
    def __call__(self, name: str, always: bool = False):
        if not (self.on or always):
            yield
            return
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
            key = f"time/{name}_s"  # a phase run twice in a step (train.fake_steps > 1) adds up
            self.values[key] = self.values.get(key, 0.0) + time.perf_counter() - start
            if self.cuda:
                peak = torch.cuda.max_memory_allocated(self.device)
                self.values[f"memory/{name}_gib"] = max(self.values.get(f"memory/{name}_gib", 0.0), peak / 2**30)
                self._peak(peak)

    def _peak(self, allocated: int) -> None:
        self.values["memory/peak_gib"] = max(self.values.get("memory/peak_gib", 0.0), allocated / 2**30)

    def take(self) -> dict[str, float]:
        """What was measured since the last take(), in key order (the same on every rank: every rank times alike)."""
        values, self.values = dict(sorted(self.values.items())), {}
        return values


class MetricLog:
    """metrics.jsonl (one JSON object per logged step), TensorBoard scalars and, with train.wandb_project, Weights &
    Biases, written by rank 0.

    Rows are appended, so a crash leaves at most a torn last line; truncate() then makes the file hold exactly the
    rows of the steps the restarted run will not redo. Rewrites go through a temporary file and os.replace, so a
    crash during one leaves the old file or the new one, never a mix. Weights & Biases keeps the first row it got
    for a step and ignores a resumed run's rows for steps it has: a resume is exact, so those hold the same values
    (but the timings)."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_project: str = "", config: dict | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb_dir = run_dir / "tensorboard"
        self.tb = self.wandb = None
        # TensorBoard hides the events an earlier writer left at or past this nimg (set by truncate): it then shows
        # what metrics.jsonl holds, not the steps a restart redoes twice
        self.tb_purge: int | None = None
        self.resumed_at, self.resumed_rows = 0, set()  # the key sets of the rows logged at the resumed step
        if enabled and wandb_project:
            self.wandb = _wandb_run(run_dir, wandb_project, config or {})

    def write(self, step: int, nimg: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "nimg": nimg, **values}
        if step == self.resumed_at and frozenset(row) in self.resumed_rows:
            # A finished run started again evaluates its last step once more: that row replaces the earlier one.
            self.resumed_rows.remove(frozenset(row))
            self._rewrite([r for r in self._rows() if not (r["step"] == step and r.keys() == row.keys())])
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.tb_dir), purge_step=self.tb_purge)
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, nimg)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({"nimg": nimg, **scalars}, step=step)

    def truncate(self, step: int) -> None:
        """Keep the rows of the steps up to `step`, where training resumes: later ones are logged again by the steps
        that redo them. At step 0 (nothing resumed) every row goes, the first evaluation's too, as it is redone."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [r for r in self._rows() if 0 < step and r["step"] <= step]
        self.resumed_at, self.resumed_rows = step, {frozenset(r) for r in kept if r["step"] == step}
        self.tb_purge = max((r["nimg"] + 1 for r in kept if type(r.get("nimg")) is int), default=0)
        if self.tb is not None:  # the purge is written when a writer opens
            self.tb.close()
            self.tb = None
        self._rewrite(kept)  # also ends the last line, which a crash may have left open

    def _rows(self) -> list[dict]:
        """The file's rows; a last line that is not one (torn by a crash) is dropped with a warning."""
        lines = self.path.read_text(errors="replace").splitlines()
        rows = []
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and type(row.get("step")) is int:
                rows.append(row)
            elif number == len(lines):
                log.warning("%s: dropped its last line, cut short by a crash while it was written: %.80r",
                            self.path, line)
            else:
                raise ValueError(f"{self.path} line {number} is not a metrics row ({line[:80]!r}): mend or delete "
                                 "that line, or move the file away, and start the run again")
        return rows

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_run(run_dir: Path, project: str, config: dict):
    """A Weights & Biases run for `run_dir`, the same one after every restart: its id is kept in the run directory."""
    try:
        import wandb
    except ImportError:
        raise ImportError("train.wandb_project is set, but wandb is not installed: pip install 'bigsid[wandb]', or "
                          "leave train.wandb_project empty (metrics.jsonl and TensorBoard log either way)") from None
    id_file = run_dir / "wandb_id"
    if not id_file.is_file():
        id_file.write_text(secrets.token_hex(8))
    return wandb.init(project=project, id=id_file.read_text().strip(), resume="allow", dir=str(run_dir),
                      name=run_dir.name, config=config)


def to_images(latents: torch.Tensor, networks: Networks, chunk: int = 8) -> torch.Tensor:
    """Latents -> uint8 images [N, H, W, 3]: VAE-decoded `chunk` at a time (a full-batch decode at 512 px or more
    is a step's likeliest out-of-memory), or, for a toy truth, the latents themselves."""
    if networks.vae is not None and networks.truth is None:
        vae = networks.vae
        x = torch.cat([decode(vae, part).float() for part in latents.split(chunk)])
        x = (x.clamp(-1, 1) + 1) / 2
    else:  # toy latents: first three channels, each image scaled to its own range
        x = latents.float()[:, :3]
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-6)
        x = x.repeat_interleave(max(1, 64 // x.shape[-1]), -1).repeat_interleave(max(1, 64 // x.shape[-2]), -2)
    return (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu()


def save_grid(images: torch.Tensor, rows: int, path: Path) -> None:
    n, h, w, c = images.shape
    cols = math.ceil(n / rows)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images.numpy()):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(path)


def _with_defaults(written: dict, defaults: dict) -> dict:
    """A config section as a checkpoint wrote it, with the keys added since filled in as their defaults (nested
    sections alike) and those removed since left out: what the run would have been under today's keys."""
    return {k: _with_defaults(written[k], v) if isinstance(v, dict) and isinstance(written.get(k), dict)
            else written.get(k, v) for k, v in defaults.items()}


class Trainer:
    def __init__(self, cfg: Config, networks: Networks | None = None, image_eval=None):
        self.cfg = cfg
        tr = cfg.train
        self.run_dir = Path(tr.run_dir)
        self.backend = build_backend(cfg)
        if tr.batch_size % self.backend.world_size:
            raise ValueError(f"train.batch_size={tr.batch_size} is not divisible by the world size "
                             f"{self.backend.world_size}; choose a multiple of it")
        self.local_batch = tr.batch_size // self.backend.world_size
        self.micro_batch = tr.micro_batch or self.local_batch
        if self.local_batch % self.micro_batch:
            raise ValueError(f"train.micro_batch={tr.micro_batch} does not divide the per-rank batch {self.local_batch} "
                             f"(train.batch_size={tr.batch_size} over {self.backend.world_size} ranks); choose a "
                             "divisor of it")
        torch.manual_seed(tr.seed)  # same initial networks on every rank
        self.networks = networks or build_networks(cfg)
        self.objective = build_objective(cfg.objective, self.networks.schedule)
        denoisers = (self.networks.teacher, self.networks.generator.net, self.networks.fake_score)
        if tr.channels_last:
            # before the backend shards or copies the weights
            to_channels_last(*denoisers, weights=cfg.parallel.backend in ("local", "ddp"))
        self.generator, self.fake_score = self.backend.prepare(self.networks)
        if tr.compile:
            compile_blocks(*denoisers)  # after sharding and wrapping: the units stay the modules they were
        self.teacher = self.networks.teacher
        self.ema = EMA(self.generator)
        self.device = self.backend.device
        self.sample_prompts = cfg.eval.sample_prompts or list(self.networks.vocabulary or [])
        self.stream = self._build_stream()
        self.step = 0
        self.nimg = 0
        self.skipped = {"nan_samples": 0, "nonfinite_steps": 0}
        self.k = None  # steps of a few-step generator's chain trained this iteration (None: all)
        self.ground_truth = None  # a toy run's reference and teacher sampler sets never change: built once
        self.pending = None  # (folder, train state, this rank's write Future) of a checkpoint being written
        self.owed: list[str] = []  # what a preempted run left undone at the step resumed from (_preempt)
        self.last_eval: dict = {}
        # Scores images of teachers without an analytic truth at eval_every (evaluation.periodic.TrainingEval, which
        # the CLI builds: the trainer only calls prompts/batches/update/result and never imports the evaluation
        # package).
        self.image_eval = image_eval
        if cfg.data.text_cache:
            self._check_text_cache()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = MetricLog(self.run_dir, self.backend.is_main, tr.wandb_project, to_dict(cfg))
        self.clock = PhaseClock(self.device)
        self.rng = torch.Generator(device=self.device).manual_seed(tr.seed + 1)
        # Kept on the device and read only at log, checkpoint and poll steps, so a step that does none of these
        # never waits for the device: [NaN samples on this rank, skipped updates, each phase's of a step its own
        # (rank 0 alone counts them: every rank skips alike)] since the last skip_counts(); the skips of the current
        # run of skipped steps; the updates applied this step (1 or 0); the first step at which each of _STOPS held.
        self.unread = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.skip_run = torch.zeros((), dtype=torch.int64, device=self.device)
        self.step_applied = torch.ones((), device=self.device)
        self.stops = torch.full((len(_STOPS),), NEVER, dtype=torch.int64, device=self.device)
        # the generator's and fake score's gradient norms of the last NORM_WINDOW steps (NaN: not yet, or non-finite)
        self.norm_window = torch.full((NORM_WINDOW, 2), math.nan, device=self.device)
        self.resume()
        self.log.truncate(self.step)  # after any restart, resumed or not
        self.shard_counts: dict = {}  # bad-data counts per shard in the last metrics row
        if self.backend.is_main:
            save_config(cfg, self.run_dir / "config.yaml")

    def _build_stream(self):
        from bigsid.data import build_prompt_stream

        enc = self.networks.encoder
        return build_prompt_stream(self.cfg.data, seed=self.cfg.train.seed, vocabulary=self.networks.vocabulary,
                                   token_count=getattr(enc, "token_count", None),
                                   max_tokens=getattr(enc, "max_length", None), log_problems=self.backend.is_main)

    def _check_text_cache(self) -> None:
        """Every prompt a run reading a text cache encodes must be in it: those known now are checked now, not
        when first drawn (a shard's prompts, read as they stream, are checked as they are)."""
        cache = self.networks.encoder
        cache.require(self.stream.prompts or [], f"the prompts of data.source = {self.cfg.data.source}")
        cache.require(self.sample_prompts, "the sample-grid prompts (eval.sample_prompts)")
        if self.image_eval is not None:
            cache.require(self.image_eval.prompts(), "the --eval prompts")

    # ---- one iteration ----

    # Every random draw is made for the global batch from one generator seeded alike on all ranks, and each rank
    # takes its slice, as of the global prompt sequence: a run's numbers do not depend on how many ranks share it.
    def _slice(self, x):
        start = self.backend.rank * self.local_batch
        return x[start:start + self.local_batch]

    def _randn(self) -> torch.Tensor:
        shape = (self.cfg.train.batch_size, *self.networks.latent_shape)
        return self._slice(torch.randn(shape, generator=self.rng, device=self.device))

    def _noise(self, power: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generator input z, diffusion time t (density ~ (t - t_min)^(power - 1)) and diffusion noise eps for this
        rank's share of the batch."""
        c = self.cfg.objective
        t = self.objective.schedule.sample_t(self.cfg.train.batch_size, c.t_min, c.t_max, self.device, self.rng,
                                             power)
        return self._randn(), self._slice(t), self._randn()

    def _batch_loss(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses of a micro-batch -> its share of the batch loss (sum / local batch, as the reference
        code: the micro-batches' gradients add up to the whole batch's), and how many are not finite.

        A NaN inside a network reaches every parameter's gradient in backward (0 x NaN) however its sample's loss is
        masked, so no sample can be left out of an update. Instead one non-finite sample makes every gradient NaN,
        and the global gradient-norm check skips the update on every rank. The count stays on the device: reading it
        before backward would stall the step."""
        bad = (~torch.isfinite(loss)).sum()
        total = loss.sum() / self.local_batch
        return total * total.new_ones(()).masked_fill(bad > 0, math.nan), bad  # x 1 when finite: bit-identical

    def _accumulate(self, trainable: Trainable, micro_loss, name: str, backward_in_autocast: bool) \
            -> dict[str, torch.Tensor]:
        """micro_loss(index) over this rank's micro-batches (index: a slice of the rank's batch), a backward after
        each with the gradients synchronised across ranks on the last only, then one optimizer step."""
        parts: dict[str, list[torch.Tensor]] = {}
        bad = 0
        count = self.local_batch // self.micro_batch
        for i in range(count):
            index = slice(i * self.micro_batch, (i + 1) * self.micro_batch)
            with trainable.micro_step(sync=i == count - 1):
                with self.backend.autocast():
                    loss, metrics = micro_loss(index)
                    total, n = self._batch_loss(loss)
                    if backward_in_autocast:
                        trainable.backward(total)
                if not backward_in_autocast:
                    trainable.backward(total)
            bad = bad + n
            for k, v in metrics.items():
                parts.setdefault(k, []).append(v)
        norm, applied = trainable.step()
        return self._finish({k: torch.cat(v) for k, v in parts.items()}, name, norm, applied.to(self.device), bad)

    def _encode_prompts(self):
        """This rank's share of the next global batch of prompts, read and encoded."""
        with self.clock("text_encoding"):
            return self.networks.encoder(self._slice(self.stream.next_batch(self.cfg.train.batch_size)))

    def fake_score_phase(self) -> dict[str, torch.Tensor]:
        cond = self._encode_prompts()
        with self.clock("fake_score"):
            rate = self.objective.prompt_drop
            cond = cond.drop(self._slice(torch.rand(self.cfg.train.batch_size, generator=self.rng,
                                                    device=self.device) < rate))
            z, t, eps = self._noise()

            def micro_loss(i):
                with torch.no_grad():
                    x_gen = self.generator.inner(z[i], cond[i], self.k)
                return self.objective.fake_score_loss(self.fake_score.module, x_gen, cond[i], t[i], eps[i])

            return self._accumulate(self.fake_score, micro_loss, "fake_score", backward_in_autocast=False)

    def generator_phase(self) -> dict[str, torch.Tensor]:
        cond = self._encode_prompts()
        # the fake score stays frozen through the backward, which runs through its input
        with self.clock("generator"), self.fake_score.frozen() as fake_score:
            z, t, eps = self._noise(self.cfg.objective.generator_t_power)

            def micro_loss(i):
                x_gen = self.generator.module(z[i], cond[i], self.k)
                return self.objective.generator_loss(self.teacher, fake_score, x_gen, cond[i], t[i], eps[i])

            return self._accumulate(self.generator, micro_loss, "generator", backward_in_autocast=True)

    def _finish(self, metrics, name, norm, applied, nan) -> dict[str, torch.Tensor]:
        """The phase's metrics and counts, all left on the device (no boolean mask: its size would be read back)."""
        skipped = (1 - applied).long() * int(self.backend.is_main)
        self.unread += torch.stack([nan, skipped])
        self.step_applied = self.step_applied * applied
        out = {}
        for k, v in metrics.items():  # the mean of the finite values: NaN where none is
            finite = torch.isfinite(v)
            out[k] = torch.where(finite, v, 0).sum() / finite.sum()
        out[f"{name}/grad_norm"] = norm.detach()
        out[f"{name}/applied"] = applied
        return out

    def lr_factor(self) -> float:
        """Learning-rate multiplier at the current nimg: a pure function of nimg, so resume needs no state."""
        o, progress = self.cfg.optim, min(1.0, self.nimg / self.cfg.train.total_nimg)
        if o.lr_schedule == "constant":
            return 1.0
        return o.lr_min_ratio + (1 - o.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def train_step(self) -> dict[str, torch.Tensor]:
        steps, seed = self.cfg.generator.steps, self.cfg.train.seed
        # A few-step generator trains a random prefix of its chain, the same for both phases and all ranks. It sets
        # how many networks run, so the host needs it: drawn there, from (seed, step), not read back from the device.
        self.k = None if steps == 1 else int(np.random.default_rng([seed, _K_DRAWS, self.step]).integers(1, steps + 1))
        factor = self.lr_factor()
        for trainable, lr in ((self.generator, self.cfg.optim.lr_generator),
                              (self.fake_score, self.cfg.optim.lr_fake_score)):
            for group in trainable.optimizer.param_groups:
                group["lr"] = lr * factor
        metrics = {"lr_factor": torch.tensor(factor)}
        self.step_applied = torch.ones((), device=self.device)
        for _ in range(self.cfg.train.fake_steps):
            metrics |= self.fake_score_phase()
        metrics |= self.generator_phase()
        self.nimg += self.cfg.train.batch_size
        self.step += 1
        with self.clock("ema"):  # and the weights check before it
            self._note_stops(torch.stack([metrics["generator/grad_norm"], metrics["fake_score/grad_norm"]]).float())
            tr = self.cfg.train
            self.ema.update(self.generator, EMA.beta(tr.batch_size, self.nimg, tr.ema_halflife_nimg, tr.ema_rampup))
        return metrics

    def _note_stops(self, norms: torch.Tensor) -> None:
        """Record on the device the first step whose update made a network's weights non-finite (a finite gradient
        can still step to inf: an overflowing learning rate), the first at which max_consecutive_skips steps in a
        row were skipped, and the first at which a network's gradient norm exceeded divergence_factor times its
        median over the previous NORM_WINDOW steps. The last is the run that diverges with finite weights: in 256
        latent dimensions the toy fake score's norm went from ~150 to 1.5e9 within 50 steps and its FD to 1e19, and
        4,000 steps trained on. _poll reads them."""
        tr = self.cfg.train
        self.skip_run = (self.skip_run + 1) * (1 - self.step_applied).long()
        level = self.norm_window.nanmedian(dim=0).values
        filled = torch.isfinite(self.norm_window).sum(dim=0) >= NORM_WINDOW // 2
        jumped = filled & (norms > tr.divergence_factor * level) & (tr.divergence_factor > 0)
        self.norm_window[self.step % NORM_WINDOW] = torch.where(torch.isfinite(norms), norms, math.nan)
        held = torch.stack([*(~t.weights_finite() for t in self._trainables().values()),
                            self.skip_run >= tr.max_consecutive_skips, *jumped])
        self.stops = torch.minimum(self.stops, torch.where(held, self.step, NEVER))

    def skip_counts(self) -> dict[str, int]:
        """NaN samples and skipped updates over all ranks since the run began (a collective: every rank calls it)."""
        nan, steps = self.backend.reduce(self.unread, "sum")
        self.unread.zero_()
        self.skipped = {"nan_samples": self.skipped["nan_samples"] + nan,
                        "nonfinite_steps": self.skipped["nonfinite_steps"] + steps}
        return self.skipped

    def _poll(self, signum: int | None):
        """Read, over all ranks and in one reduction, what the host must act on: the stop conditions the device
        recorded, whether the optimizers' moments are finite, a preemption signal, whether an asynchronous checkpoint
        is written. Every write of weights (a checkpoint, sample grids, an evaluation) comes at a poll step, after the
        poll: so weights from an update at or after one that went non-finite are never saved. The EMA may have taken
        them in meanwhile; it is never saved either, as the run stops here.

        Returns what ends the run once this step's metrics row is written (max_consecutive_skips reached, a
        preemption signal), to be called with the step's owed outputs; None where the run goes on."""
        done = self.pending is None or self.pending[2] is None or self.pending[2].done()
        host = torch.tensor([int(signum is None), int(done)], device=self.device)
        moments = torch.stack([tr.moments_finite().to(self.device) for tr in self._trainables().values()]).long()
        read = self.backend.reduce(torch.cat([self.stops, moments, host]), "min")
        stops, moments_ok, (quiet, all_done) = read[:len(_STOPS)], read[len(_STOPS):-2], read[-2:]
        at = dict(zip(_STOPS, stops))
        broken = [name for name in ("generator", "fake_score") if at[name] != NEVER]
        stalled = [name for name, ok in zip(self._trainables(), moments_ok) if not ok]
        if broken:
            self._stop(f"the {' and '.join(broken)} weights became non-finite in the update of step "
                       f"{min(at[name] for name in broken)}",
                       "Lower the learning rates, set optim.grad_clip, or use train.precision=fp32")
        diverged = [name for name in ("generator", "fake_score") if at[f"{name}_norm"] != NEVER]
        if diverged:
            self._stop(f"the {' and '.join(diverged)} gradient norm rose past train.divergence_factor="
                       f"{self.cfg.train.divergence_factor:g} times its median over the previous {NORM_WINDOW} steps "
                       f"at step {min(at[f'{name}_norm'] for name in diverged)}: training diverged",
                       "Lower the learning rates (optim.lr_generator, optim.lr_fake_score) or set optim.grad_clip; "
                       "train.divergence_factor=0 turns this check off")
        if stalled:
            self._stop(f"the {' and '.join(stalled)} optimizer state (Adam's moments) became non-finite by step "
                       f"{self.step}: a gradient too large for float32 squares, after which those weights would "
                       "silently stop learning", "Set optim.grad_clip or lower the learning rates")
        if self.pending is not None and all_done:
            self.finish_checkpoint()
        if at["skips"] != NEVER:
            return functools.partial(self._stop_skipping, int(at["skips"]))
        return None if quiet else functools.partial(self._preempt, signum)

    def _stop_skipping(self, since: int, owed: list[str]) -> None:
        folder = self.save_checkpoint()
        raise TrainingError(
            f"{self.cfg.train.max_consecutive_skips} steps in a row (up to step {since}) had non-finite gradients; "
            f"stopped at step {self.step} with the last good weights in {folder}. Lower the learning rates, set "
            "optim.grad_clip, use train.precision=fp32, or check the teacher and the prompts")

    def _preempt(self, signum: int, owed: list[str]) -> None:
        """Checkpoint this step and exit for requeue. The sample grid and evaluation due at this step are `owed`:
        the resumed run makes them before its first step, so the signal's grace period goes to the checkpoint."""
        folder = self.save_checkpoint(owed=owed)
        self.log.close()
        log.warning("signal %s: checkpoint %s written at step %d; exiting for requeue", signum, folder, self.step)
        raise Preempted(folder)

    def _stop(self, what: str, advice: str) -> None:
        """Stop on a state that must not be saved, pointing at the last one that was."""
        self.finish_checkpoint()  # an asynchronous checkpoint in flight holds an earlier, finite step
        last = checkpoint.latest_checkpoint(self.run_dir)
        raise TrainingError(f"{what}; nothing was saved from it. The last good state is "
                            + (f"{last} (run the same command to resume from it)" if last is not None else
                               f"not saved: {self.run_dir} has no complete checkpoint") + f". {advice}")

    # ---- the run ----

    def run(self) -> dict:
        tr = self.cfg.train
        total_steps = tr.total_nimg // tr.batch_size
        bar = None
        if tr.progress and self.backend.is_main:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=self.step, unit="it", dynamic_ncols=True)
        if tr.eval_every and self.step == 0:
            self.evaluate()  # the starting point of the FD curve
        self._outputs(self.owed)  # what the preempted run this one resumes left undone
        last_time, last_nimg = time.perf_counter(), self.nimg
        flag = PreemptionFlag()
        try:
            self._loop(total_steps, bar, last_time, last_nimg, flag)
        except TrainingError:
            self.log.close()  # TensorBoard's and Weights & Biases' buffers hold the rows that show what went wrong
            raise
        finally:
            flag.restore()
            if bar is not None:
                bar.close()
        if not (tr.checkpoint_every and self.step % tr.checkpoint_every == 0):
            self.save_checkpoint()
        self.finish_checkpoint()
        if not (tr.sample_every and self.step % tr.sample_every == 0):
            self.save_samples()
        if not (tr.eval_every and self.step % tr.eval_every == 0):
            self.last_eval = self.evaluate()
        self._summarise_data()
        self.log.close()
        return self.last_eval if self.backend.is_main else {}  # one rank reports


    def _data_counts(self) -> dict:
        """Bad-data counts for a metrics row: the prompts taken and the problems per kind so far, and per shard for
        the shards whose counts changed since the last row (all of them, over thousands of shards, would swamp it)."""
        from bigsid.data import ISSUES

        stats = self.stream.stats()  # every rank reads the whole sequence: the same counts everywhere
        per_kind = stats["skipped"] | stats["repaired"]
        changed = {shard: kinds for shard, kinds in stats["by_shard"].items() if self.shard_counts.get(shard) != kinds}
        self.shard_counts = stats["by_shard"]
        return {"data/prompts": stats["prompts"], **{f"data/{kind}": per_kind.get(kind, 0) for kind in ISSUES},
                **({"data/by_shard": changed} if changed else {})}

    def _summarise_data(self) -> None:
        if not self.backend.is_main:
            return
        stats = self.stream.stats()
        per_kind = stats["skipped"] | stats["repaired"]
        if not per_kind:
            log.info("prompt data: %d prompts, no problems", stats["prompts"])
            return
        shards = sorted(stats["by_shard"].items(), key=lambda item: -sum(item[1].values()))
        log.warning("prompt data: %d prompts; problems: %s, in %d shards, the most in %s (per shard: "
                    "'data/by_shard' in %s)", stats["prompts"], ", ".join(f"{k} {n}" for k, n in per_kind.items()),
                    len(shards), "; ".join(f"{shard} ({', '.join(f'{k} {n}' for k, n in kinds.items())})"
                                           for shard, kinds in shards[:3]), self.log.path)

    def _loop(self, total_steps, bar, last_time, last_nimg, flag: PreemptionFlag) -> None:
        tr = self.cfg.train
        due = lambda every: every and self.step % every == 0
        while self.step < total_steps:
            self.clock.start_step(bool(tr.log_every) and (self.step + 1) % tr.log_every == 0)
            metrics = self.train_step()
            if bar is not None:
                bar.update(1)
            halt = None
            if (due(tr.poll_every) or due(tr.sample_every) or due(tr.eval_every) or due(tr.checkpoint_every)
                    or self.step == total_steps):
                halt = self._poll(flag.signum)
            if due(tr.log_every):
                values = self.backend.mean(metrics)
                now = time.perf_counter()
                values |= {"images_per_s": (self.nimg - last_nimg) / (now - last_time), **self.skip_counts(),
                           **self._slowest(self.clock.take()), **self._data_counts()}
                last_time, last_nimg = now, self.nimg
                self.log.write(self.step, self.nimg, values)
                if bar is not None:
                    bar.set_postfix(gen=f"{values['generator/loss']:.3g}", fake=f"{values['fake_score/loss']:.3g}")
            outputs = [name for name, every in (("samples", tr.sample_every), ("eval", tr.eval_every)) if due(every)]
            if halt is not None:
                halt(outputs)
            self._outputs(outputs)
            if due(tr.checkpoint_every):  # asynchronous: the time the loop waits, for the copy to host memory
                with self.clock("checkpoint", always=True):
                    self.save_checkpoint(asynchronous=tr.async_checkpoint)

    def _outputs(self, names: list[str]) -> None:
        """The step's sample grid ("samples") and evaluation ("eval"), timed for the next metrics row."""
        if "samples" in names:
            with self.clock("samples", always=True):
                self.save_samples()
        if "eval" in names:
            with self.clock("eval", always=True):
                self.evaluate()

    def _slowest(self, values: dict[str, float]) -> dict[str, float]:
        """Each timing and peak at its largest over ranks: the slowest rank sets the pace, the fullest runs out first
        (a collective: every rank clocks the same phases, so holds the same keys)."""
        return dict(zip(values, self.backend.reduce(torch.tensor(list(values.values()), dtype=torch.float64,
                                                                 device=self.device), "max")))

    @torch.no_grad()
    def save_samples(self) -> Path | None:
        """Every rank runs the (possibly sharded) generator; rank 0 writes the grid (for a toy truth, the samples
        on the plane through each prompt's modes beside the reference and the teacher's sampler)."""
        if self.networks.truth is not None:
            return self._save_toy_samples()
        if not self.sample_prompts:
            return None
        seeds = self.cfg.eval.sample_seeds
        prompts = [p for p in self.sample_prompts for _ in range(seeds)]
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(len(prompts), *self.networks.latent_shape, generator=gen).to(self.device)
        with self.ema.applied(self.generator) as g:
            latents = g(z, self.networks.encoder(prompts))
        path = self.run_dir / "samples" / f"step-{self.step:09d}.png"
        if self.backend.is_main:  # every rank ran the generator (it may be sharded); one decodes
            # In bf16 under train.precision=bf16: SD's VAE decoder overflows fp16 (activations past 65504, hence the
            # fp16-fix VAEs) but not bf16, whose range is fp32's, and its ~3 significant digits suit a grid to look
            # at. Training-time evaluation (_evaluate_images) decodes in fp32, so its metrics do not move.
            with self.backend.autocast():
                images = to_images(latents, self.networks)
            save_grid(images, len(self.sample_prompts), path)
        return path

    def _ground_truth(self):
        from bigsid import toy

        if self.ground_truth is None:
            self.ground_truth = toy.GroundTruth(self.networks, self.cfg.eval, guidance=self.cfg.objective.kappa4)
        return self.ground_truth

    @torch.no_grad()
    def _save_toy_samples(self) -> Path:
        from bigsid import toy

        truth, path = self._ground_truth(), self.run_dir / "samples" / f"step-{self.step:09d}.png"
        count = min(1000, truth.num_samples)  # as many as the plot shows of the reference's, so densities compare
        with self.ema.applied(self.generator) as g:
            samples = {p: toy.sample_generator(g, self.networks.encoder, p, count, truth.truth.latent_shape, seed=i)
                       for i, p in enumerate(truth.truth.prompts)}
        if self.backend.is_main:
            truth.plot(path, samples, toy.fd_history(self.run_dir), self.last_eval)
        return path

    def evaluate(self) -> dict:
        """Ground-truth metrics of the EMA generator (toy teachers only); appended to metrics.jsonl. Other teachers
        get the image evaluation, if one was given, logged the same way (and not returned: it is no toy report)."""
        if self.networks.truth is None:
            if self.image_eval is not None:
                self._evaluate_images()
            return {}
        first = self.ground_truth is None
        ground_truth = self._ground_truth()
        with self.ema.applied(self.generator) as g:
            metrics = ground_truth.score(g, self.networks.encoder)
        if first and not metrics["teacher_fit_ok"] and self.backend.is_main:
            log.warning("the teacher's own %d-step sampler is at FD %.4g from the truth, the exact denoiser's at %.4g "
                        "(noise floor %.4g): the teacher is a poor fit, so reaching its FD says little. Raise "
                        "teacher.student_fit_steps or teacher.student_width", metrics["teacher_sampler_steps"],
                        metrics["fd_teacher_sampler"], metrics["fd_exact_sampler"], metrics["fd_reference"])
        metrics |= {"step": self.step, "nimg": self.nimg}
        self.log.write(self.step, self.nimg, {f"eval/{k}": v for k, v in metrics.items()
                                             if isinstance(v, float)})
        self.last_eval = metrics
        return metrics

    @torch.no_grad()
    def _evaluate_images(self) -> None:
        """Every rank runs the (possibly sharded) EMA generator on the same prompts and noise, as for sample grids;
        rank 0 scores and logs eval/NAME."""
        ev = self.image_eval
        with self.ema.applied(self.generator) as g:
            for prompts, z in ev.batches(self.networks.latent_shape):
                latents = g(z.to(self.device), self.networks.encoder(prompts))
                if self.backend.is_main:
                    ev.update(to_images(latents, self.networks), prompts)
        if self.backend.is_main:
            metrics = ev.result(self.run_dir, self.nimg)
            self.log.write(self.step, self.nimg, {f"eval/{k}": v for k, v in metrics.items()})

    # ---- checkpoints ----

    def save_checkpoint(self, asynchronous: bool = False, owed: list[str] = ()) -> Path:
        """Write a checkpoint of this step; visible (committed) now, or for an asynchronous one, at the first step
        boundary where every rank's writes are done. `owed`: the step's "samples" and "eval" not yet made."""
        self.finish_checkpoint()  # one write in flight at a time
        folder = checkpoint.checkpoint_dir(self.run_dir, self.step).with_suffix(".partial")
        if self.backend.is_main:
            checkpoint.begin(self.run_dir, self.step)
        self.backend.barrier()
        rank_state = {"rng": self.rng.get_state()}
        written = self.backend.save(folder, self._trainables(), self.ema.state_dict(), rank_state, asynchronous)
        state = {"step": self.step, "nimg": self.nimg, "skipped": dict(self.skip_counts()),
                 "skip_run": int(self.skip_run), "owed": list(owed), "data": self.stream.state_dict(),
                 "norm_window": [[v if math.isfinite(v) else None for v in row] for row in self.norm_window.tolist()],
                 "config": to_dict(self.cfg)}
        self.pending = (folder, state, written)
        return folder.with_suffix("") if asynchronous else self.finish_checkpoint()

    def finish_checkpoint(self) -> Path | None:
        """Wait for this rank's writes of the pending checkpoint, then rank 0 commits it once all ranks are done."""
        if self.pending is None:
            return None
        folder, state, written = self.pending
        self.pending = None
        if written is not None:
            written.result()  # re-raises a failed write
        self.backend.barrier()
        # every rank hashes its share of the files, listed once by rank 0 (listings may lag on shared storage)
        names = self.backend.gather(checkpoint.files(folder) if self.backend.is_main else None)[0]
        share = checkpoint.digest(folder, names[self.backend.rank::self.backend.world_size])
        digests = {k: v for part in self.backend.gather(share) for k, v in part.items()}
        if not self.backend.is_main:
            return folder.with_suffix("")
        return checkpoint.commit(folder, state, self.cfg.train.keep_checkpoints, digests)

    def _trainables(self):
        return {"generator": self.generator, "fake_score": self.fake_score}

    def _checkpoint_problems(self, folder: Path) -> list[str]:
        """What is wrong with a checkpoint's files, each rank verifying its share; the same list on every rank."""
        b = self.backend
        return [p for part in b.gather(checkpoint.verify(folder, b.rank, b.world_size)) for p in part]

    def _set_aside(self, folder: Path, problems: list[str]) -> Path:
        return self.backend.gather(checkpoint.set_aside(folder, problems) if self.backend.is_main else None)[0]

    def resume(self) -> None:
        folder = checkpoint.newest_usable(self.run_dir, self._checkpoint_problems, self._set_aside)
        if folder is None:
            return
        state, current = checkpoint.read_state(folder), to_dict(self.cfg)
        # a section or key a checkpoint predates reads as its default
        saved = {key: _with_defaults(state["config"].get(key, {}), value) for key, value in to_dict(Config()).items()}
        for key in ("teacher", "generator", "fake_score", "objective"):
            if saved[key] != current[key]:
                raise checkpoint.CheckpointError(
                    f"{folder} was written with a different {key} config; resume with the run's own "
                    f"config.yaml or choose a new train.run_dir")
        backend, batch = saved["parallel"]["backend"], saved["train"]["batch_size"]
        if CHECKPOINT_FORMATS[backend] != CHECKPOINT_FORMATS[self.cfg.parallel.backend]:
            raise checkpoint.CheckpointError(
                f"{folder} was written by parallel.backend={backend}, whose checkpoints parallel.backend="
                f"{self.cfg.parallel.backend} cannot read; resume with parallel.backend={backend} (on any number of "
                "ranks), or choose a new train.run_dir")
        if batch != self.cfg.train.batch_size:
            raise checkpoint.CheckpointError(
                f"{folder} was written at train.batch_size={batch}: the run counts its steps in batches, so another "
                f"batch size would end it at another number of images; resume with train.batch_size={batch} (split "
                "it with train.micro_batch to fit memory), or choose a new train.run_dir")
        rank_state = self.backend.load(folder, self._trainables(), self.ema.state_dict())
        if rank_state is None:  # more ranks than wrote the checkpoint: every rank saved the same generator state
            rank_state = checkpoint.read_rank_state(folder, 0)
        if rank_state is None:
            raise checkpoint.CheckpointError(f"{folder} has no rank0.safetensors (the run's noise state); move the "
                                             "folder away to resume from an older checkpoint")
        self.rng.set_state(rank_state["rng"])
        if isinstance(state["data"], dict):  # a position in the global sequence: it continues on any world size
            self.stream.load_state_dict(state["data"])
        else:
            # Written when each rank read a stream of its own: those cannot be continued in the global sequence.
            # Weights, optimizer states, EMA and noise carry over exactly, and so do the bad-data counts, summed.
            log.warning("resuming %s, written with per-rank prompt streams: the prompt sequence restarts", folder)
            self.stream.load_counts(state["data"])
        self.step, self.nimg, self.skipped = state["step"], state["nimg"], state["skipped"]
        self.skip_run.fill_(state.get("skip_run", 0))  # keys a checkpoint predates: what it then implied
        window = state.get("norm_window", [[None, None]] * NORM_WINDOW)
        self.norm_window.copy_(torch.tensor([[math.nan if v is None else v for v in row] for row in window]))
        self.owed = state.get("owed", [])
        log.info("resumed from %s at step %d (%d images)", folder, self.step, self.nimg)
