"""Throughput and memory of bigsid's training step on real-size networks of every family with random weights.

Builds teacher, generator and fake score from a network config shipped in bigsid/unet_configs/ (the SD1.5 UNet at
512 px, SDXL's at 1024 px, PixArt-alpha's transformer at 512 px and PixArt-Sigma's at 1024 px, SD3.5-medium's MM-DiT
at 1024 px on its rectified flow), random weights, called through the family's denoiser, and times
Trainer.train_step (the fake-score phase, the generator phase with SiD-LSG's kappa = 1.5, so guided teacher and
fake-score calls at twice the batch, both Adam steps and the EMA update) for every model x backend x activation
checkpointing x train.compile asked for. Reports seconds per step, images/s, peak memory beside what `bigsid plan`
estimates for the same run, and two FLOP rates against the GPU's dense bf16 peak: MFU, the model FLOPs of the step
(torch's FlopCounterMode over each network call on the meta device, without recomputation, as bigsid.plan counts
them; tests/test_plan.py checks that count against FlopCounterMode over a real step), and HFU, FlopCounterMode over
one real step of the measured setting (recomputation included; eager settings only, a compiled one takes its eager
twin's count, the same arithmetic). FlopCounterMode counts the CUDA fused attention kernels but has no formula for
the CPU one, so on a CPU HFU leaves attention out.

One process runs every setting in turn, on one device (the multi-process backends as a world of one) or under
torchrun on several; settings the planner says cannot fit the device are skipped, and none is started once
--budget-s seconds have gone (compilation is slow: compiled settings run after all eager ones). Results go to
benchmarks/results/throughput_<device>.{json,md}; rows from earlier runs on the same device are kept unless the same
setting is measured again.

    python benchmarks/bench_throughput.py                      # one H100: the whole matrix in under 8 minutes
    python benchmarks/bench_throughput.py --models sd15 --backends fsdp2 --compile off on --batch 16
    torchrun --nproc_per_node=8 benchmarks/bench_throughput.py --models sdxl --backends fsdp2 zero3
    python benchmarks/bench_throughput.py --models pixart_alpha_512 sd35_medium --backends fsdp2
    python benchmarks/bench_throughput.py --tiny              # CPU: the tiny UNet and PixArt, the same matrix
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bigsid import plan
from bigsid.config import load_config
from bigsid.diffusion import SD_SCHEDULER_CONFIG, Schedule
from bigsid.families import FAMILIES
from bigsid.models import Networks, OneStepGenerator
from bigsid.text import Cond
from bigsid.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) by device-name fragment, the longest matching fragment
# first; H200 and GH200 have H100 SXM's compute.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "B200": 2250.0,
               "A100": 312.0, "L40S": 362.0}
BACKENDS = ("local", "ddp", "fsdp2", "zero2", "zero3")
DEFAULT_BATCH = {"sd15": 8, "sd21": 8, "sdxl": 2, "pixart_alpha_512": 8, "pixart_sigma_1024": 2, "sd35_medium": 2,
                 "tiny": 2, "tiny_pixart": 2}  # per GPU
# The teachers' training schedules: SD's betas for the VP families (PixArt's linear betas cost the same), SD3's
# rectified flow with its shift
SCHEDULER_CONFIGS = {"sd": SD_SCHEDULER_CONFIG, "sdxl": SD_SCHEDULER_CONFIG, "pixart": SD_SCHEDULER_CONFIG,
                     "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                             "shift": 3.0}}


class RandomPromptEncoder(nn.Module):
    """Every prompt encodes to one fixed random conditioning of the family's shapes (plan.denoiser_inputs: SDXL's
    pooled embedding and size ids, PixArt's T5 tokens and mask, SD3's CLIP and T5 tokens and pooled embedding):
    the text encoders are not what is being timed."""

    def __init__(self, cond: Cond):
        super().__init__()
        for name in ("emb", "pooled", "mask", "size"):
            self.register_buffer(name, getattr(cond, name))

    def forward(self, prompts: list[str]) -> Cond:
        one = Cond(self.emb, self.pooled, self.mask, self.size)
        return dataclasses.replace(one[[0] * len(prompts)], uncond=one)


def random_networks(model: plan.ModelSpec, checkpointing: tuple[str, ...], t_init: int,
                    device: torch.device) -> Networks:
    """What models.build_networks makes from a pipeline folder, from a network config and random weights instead."""
    import diffusers

    family = FAMILIES[model.family]
    scheduler_config = dict(SCHEDULER_CONFIGS[model.family])
    schedule = Schedule.from_scheduler_config(scheduler_config)
    with torch.device(device):  # initialised where it runs: seconds on a GPU for SDXL, not minutes on the host
        network = getattr(diffusers, family.network_class).from_config(model.network_config)
    if isinstance(network, diffusers.UNet2DConditionModel):
        from diffusers.models.attention_processor import AttnProcessor2_0

        network.set_attn_processor(AttnProcessor2_0())
    teacher = family.denoiser(network, schedule.prediction_type)
    generator_net, fake_score = copy.deepcopy(teacher), copy.deepcopy(teacher)
    teacher.requires_grad_(False).eval()
    for name, net in (("generator", generator_net), ("fake_score", fake_score), ("teacher", teacher)):
        if net is not teacher:
            net.requires_grad_(True).train()
        if name in checkpointing:
            net.network.enable_gradient_checkpointing()
    torch.manual_seed(0)
    _, _, cond = plan.denoiser_inputs(teacher, 1, model.latent_size, model.text_tokens, device)
    shape = (model.network_config["in_channels"], model.latent_size, model.latent_size)
    return Networks(teacher, OneStepGenerator(generator_net, schedule, t_init), fake_score, schedule,
                    RandomPromptEncoder(cond), shape, scheduler_config, vocabulary=["a benchmark prompt"],
                    family=family)


def resident_bytes(trainer) -> int:
    """Bytes of the tensors a step starts from: weights, buffers, optimizer states, EMA (each storage once)."""
    nets = (trainer.teacher, trainer.generator.inner, trainer.fake_score.inner, trainer.networks.encoder)
    # ZeRO-3 parameters are empty placeholders; their partitions (ds_tensor) hold the bytes
    tensors = [getattr(t, "ds_tensor", t) for n in nets for t in (*n.parameters(), *n.buffers())]
    tensors += [v for tr in (trainer.generator, trainer.fake_score) for s in tr.optimizer.state.values()
                for v in s.values() if torch.is_tensor(v)]
    tensors += trainer.ema.shadow
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in local}.values())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device) -> float | None:
    name = device_name(device)
    return next((PEAK_TFLOPS[k] for k in sorted(PEAK_TFLOPS, key=len, reverse=True) if k in name), None)


def measure(model: plan.ModelSpec, args, device: torch.device, backend_name: str, checkpointing: tuple[str, ...],
            compiled: bool, counted: dict) -> dict:
    """One setting: warm-up steps (compilation included), timed steps, peak memory, one step under FlopCounterMode
    (eager settings; `counted` keeps each count for the compiled twin); the planner's estimate beside them."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    batch = args.batch or DEFAULT_BATCH.get(model.name, 8)
    cfg = load_config(None, [
        f"train.run_dir={tempfile.mkdtemp(prefix='bench_throughput_')}", "train.progress=false",
        "train.log_every=0", "train.sample_every=0", "train.checkpoint_every=0", "train.total_nimg=100000000",
        f"train.batch_size={batch * world}", f"train.precision={args.precision}", f"train.device={device}",
        *(["parallel.backend=deepspeed", f"parallel.zero_stage={backend_name[-1]}"]
          if backend_name.startswith("zero") else [f"parallel.backend={backend_name}"]),
        f"train.activation_checkpointing=[{','.join(checkpointing)}]", f"train.compile={str(compiled).lower()}",
        "objective.name=sid", *(f"objective.kappa{i}=1.5" for i in range(1, 5)), *args.overrides])
    shard = {"fsdp2": cfg.parallel.shard_size or world, "zero2": world, "zero3": world}.get(backend_name, 1)
    backend = plan.Backend(backend_name, world, shard)
    estimate = plan.estimate(model, cfg, backend, checkpointing, batch, args.gpu_mem, device.type)
    row = {"date": datetime.date.today().isoformat(), "model": model.name, "resolution": model.latent_size * 8,
           "backend": backend.label, "gpus": world, "checkpointing": plan.checkpoint_label(checkpointing),
           "compile": compiled, "batch_per_gpu": batch, "precision": args.precision,
           "planned_gib": estimate.allocated / plan.GiB,
           "planned_resident_gib": sum(estimate.bytes[k] for k in plan.RESIDENT) / plan.GiB,
           "planned_phase": estimate.phase, "planned_fits": estimate.fits}
    if estimate.allocated > args.gpu_mem * plan.GiB:
        return row | {"status": f"skipped: planned {estimate.allocated / plan.GiB:.0f} GiB > {args.gpu_mem:.0f} GiB"}
    key = (model.name, backend.label, row["checkpointing"], batch)
    trainer = None
    try:
        trainer = Trainer(cfg, networks=random_networks(model, checkpointing, cfg.generator.t_init, device))
        applied = []
        start = time.perf_counter()
        for _ in range(args.warmup):
            trainer.train_step()
        synchronize(device)
        warmup = time.perf_counter() - start
        if device.type == "cuda":
            state = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            state = resident_bytes(trainer)
        start = time.perf_counter()
        for _ in range(args.iters):
            metrics = trainer.train_step()
            # kept on the device: reading it here would synchronise every timed step
            applied.append(torch.stack([v for k, v in metrics.items() if k.endswith("/applied")]).bool().all())
        synchronize(device)
        seconds = (time.perf_counter() - start) / args.iters
        applied = [bool(a) for a in applied]
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        else:  # no allocator statistics on the host: follow every storage of one more step
            live = plan.LiveMemory()
            with live:
                trainer.train_step()
            peak = state + live.peak
        if not compiled:  # dispatch-level counting: a compiled block's fused kernels would escape it
            counter = FlopCounterMode(display=False)
            with counter:
                trainer.train_step()
            counted[key] = counter.get_total_flops()
    except torch.OutOfMemoryError:
        return row | {"status": "out of memory"}
    finally:
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    flops, hardware = plan.iteration_flops(model, cfg, batch), counted.get(key)
    peak_rate = args.peak_tflops or peak_tflops(device)
    return row | {
        "status": "ok" if all(applied) else f"{applied.count(False)} of {len(applied)} steps skipped (non-finite)",
        "warmup_s": warmup, "seconds_per_step": seconds, "images_per_s": cfg.train.batch_size / seconds,
        "images_per_s_per_gpu": batch / seconds, "model_tflop_per_step_per_gpu": flops / 1e12,
        "counted_tflop_per_step_per_gpu": hardware / 1e12 if hardware else None,
        "achieved_tflops_per_gpu": flops / seconds / 1e12,
        "mfu": flops / seconds / (peak_rate * 1e12) if peak_rate else None,
        "hfu": hardware / seconds / (peak_rate * 1e12) if peak_rate and hardware else None, "peak_tflops": peak_rate,
        "peak_gib": peak / plan.GiB, "resident_gib": state / plan.GiB}


def write(rows: list[dict], device: str, machine: str) -> Path:
    """Merge rows into throughput_<device>.json (same setting: replaced) and render the Markdown table."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    path = RESULTS / f"throughput_{slug}.json"
    key = ("model", "resolution", "backend", "gpus", "checkpointing", "compile", "batch_per_gpu", "precision")
    old = [{"compile": False} | r for r in json.loads(path.read_text())["rows"]] if path.is_file() else []
    merged = {tuple(r[k] for k in key): r for r in old + rows}
    ordered = sorted(merged.values(), key=lambda r: tuple(str(r[k]) for k in key))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device, "machine": machine, "rows": ordered}, indent=1) + "\n")

    def num(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    lines = [f"# Training-step throughput and memory: {device}\n", f"Machine: {machine}.\n",
             "`python benchmarks/bench_throughput.py` (module docstring): random-weight networks from "
             "bigsid/unet_configs/, SiD-LSG (kappa 1.5: guided teacher and fake-score calls at twice the batch), "
             "Trainer.train_step = fake-score phase + generator phase + both Adam steps + EMA. MFU: model FLOPs "
             "(FlopCounterMode, no recomputation) over time, against the dense bf16 peak; HFU: FlopCounterMode over "
             "a real step (recomputation included; on a CPU without attention, whose fused kernel it cannot count). "
             "warm-up: the first steps, compilation included. planned: `bigsid "
             "plan`'s allocated bytes for the same setting (peak: torch.cuda.max_memory_allocated; on a CPU, every "
             "storage followed).\n",
             "| date | model | px | backend | GPUs | ckpt | compile | batch/GPU | precision | warm-up s | s/step "
             "| images/s | images/s/GPU | TFLOP/s/GPU | MFU | HFU | peak GiB | planned GiB | resident GiB "
             "| planned resident GiB | status |",
             "|" + " --- |" * 21]
    for r in ordered:
        lines.append("| " + " | ".join([
            r["date"], r["model"], str(r["resolution"]), r["backend"], str(r["gpus"]), r["checkpointing"],
            "yes" if r["compile"] else "no", str(r["batch_per_gpu"]), r["precision"], num(r.get("warmup_s"), ".1f"),
            num(r.get("seconds_per_step"), ".3f"),
            num(r.get("images_per_s"), ".2f"), num(r.get("images_per_s_per_gpu"), ".2f"),
            num(r.get("achieved_tflops_per_gpu"), ".3g"),
            *(num(r[k] * 100, ".1f") + "%" if r.get(k) is not None else "-" for k in ("mfu", "hfu")),
            num(r.get("peak_gib"), ".3g"),
            num(r["planned_gib"], ".3g"), num(r.get("resident_gib"), ".3g"), num(r["planned_resident_gib"], ".3g"),
            r["status"]]) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return path.with_suffix(".md")


def parse_checkpointing(value: str) -> tuple[str, ...]:
    if value in ("none", "all"):
        return () if value == "none" else plan.NETWORKS
    names = tuple(value.split(","))
    if not set(names) <= set(plan.NETWORKS):
        raise argparse.ArgumentTypeError(f"{value!r}: none, all or a comma list of {', '.join(plan.NETWORKS)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl", "pixart_alpha_512", "pixart_sigma_1024",
                                                         "sd35_medium"],
                        help=f"presets of bigsid/unet_configs ({', '.join(plan.PRESETS)}) or network config.json "
                        "files (UNet, PixArt or SD3 transformer), each at its native resolution")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: each network's own)")
    parser.add_argument("--batch", type=int, default=0, help="per-GPU batch (default: DEFAULT_BATCH by model, 8 "
                        "for a config file)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS,
                        help="zero2/zero3: parallel.backend=deepspeed at that ZeRO stage")
    parser.add_argument("--checkpointing", nargs="+", type=parse_checkpointing, default=[(), plan.NETWORKS],
                        help="settings to measure: none, all, or e.g. generator,fake_score (default: none all)")
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=("off", "on"))
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no setting after this many seconds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--gpu-mem", type=float, default=None, help="GiB for the planner (default: the device's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by GPU name)")
    parser.add_argument("--tiny", action="store_true", help="the tiny UNet and PixArt transformer on the CPU, one "
                        "warm-up and two timed steps")
    parser.add_argument("--no-write", action="store_true", help="print the rows, write no results")
    parser.add_argument("overrides", nargs="*", help="bigsid config overrides, e.g. objective.name=dmd")
    args = parser.parse_args()
    if args.tiny:
        args.models, args.device, args.warmup, args.iters = ["tiny", "tiny_pixart"], "cpu", 1, 2
    if "RANK" not in os.environ:  # one process: the multi-process backends run as a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(29500 + os.getpid() % 1000))
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if args.gpu_mem is None:
        args.gpu_mem = torch.cuda.get_device_properties(device).total_memory / plan.GiB if use_cuda else 80.0
    # no text encoder or VAE here: the planner must not count them either
    models = [dataclasses.replace(plan.load_model(m, resolution=args.resolution), text_params=0, vae_params=0,
                                  vae_config=None) for m in args.models]
    settings = [(model, backend, checkpointing, compiled == "on") for compiled in args.compile for model in models
                for backend in args.backends for checkpointing in args.checkpointing]
    load = os.getloadavg()[0]  # other work on the host slows a CPU run
    main_rank = os.environ["RANK"] == "0"
    rows, counted, began = [], {}, time.perf_counter()
    for model, backend, checkpointing, compiled in settings:
        if time.perf_counter() - began > args.budget_s:
            if main_rank:
                print(f"not run (--budget-s {args.budget_s:g} spent): {model.name} {backend} "
                      f"{plan.checkpoint_label(checkpointing)} compile={compiled}", flush=True)
            continue
        row = measure(model, args, device, backend, checkpointing, compiled, counted)
        rows.append(row)
        if main_rank:
            print(json.dumps(row), flush=True)
    if main_rank and not args.no_write:
        skipped = len(settings) - len(rows)
        machine = (f"{platform.platform()}, {os.cpu_count()} CPU cores (1-minute load average {load:.1f} when the "
                   f"run began), Python {platform.python_version()}, torch {torch.__version__}"
                   + (f", CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {device_name(device)}"
                      if use_cuda else "")
                   + f"; `{' '.join(['python', *sys.argv])}`, {time.perf_counter() - began:.0f} s in all"
                   + (f", {skipped} settings not run (--budget-s)" if skipped else ""))
        print(f"wrote {write(rows, device_name(device), machine)}")


if __name__ == "__main__":
    main()
