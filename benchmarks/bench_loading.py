"""Peak host memory per rank while a run sets up: teacher, generator and fake score loaded and sharded by FSDP2 or
partitioned by DeepSpeed ZeRO-3 (--backend).

A Stable Diffusion pipeline folder with a UNet of SD1.5's architecture (bigsid/unet_configs/sd15.json, random
weights; its channel widths scaled by --width, cross-attention sized to the small text encoder) is written once.
Then 2 CPU ranks (gloo) each build the networks as a run does (models.build_networks, then the backend's prepare) under
train.precision=bf16, and report how far their resident set rose above where it stood before: the kernel's
high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the resident set (VmRSS) at the start, once the
networks are placed (loaded and sharded: Backend.place) and at the end of prepare (ZeRO-3's engines then allocate
Adam's moments and the gradients' partitions, which FSDP2 allocates at the first step).

Before and after a change, run the same script against each version of the package, e.g. the parent commit's:
  git archive <commit> bigsid | tar -x -C /tmp/before
  (cd /tmp && PYTHONPATH=/tmp/before python $REPO/benchmarks/bench_loading.py --label before --code <commit>)
  python benchmarks/bench_loading.py --label after --code <commit>
Each run adds its row to benchmarks/results/loading_<machine>.json (replacing one of the same label, width and
backend).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = {"fsdp2": ["parallel.backend=fsdp2"], "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def write_pipeline(folder: Path, width: float) -> None:
    from diffusers import UNet2DConditionModel

    from bigsid.config import GMMConfig
    from bigsid.toy import GMM, build_toy_pipeline

    pipe = build_toy_pipeline(GMM.from_config(GMMConfig(num_prompts=2, modes_per_prompt=2, latent_shape=[4, 64, 64])))
    config = json.loads((ROOT / "bigsid/unet_configs/sd15.json").read_text())
    config["block_out_channels"] = [round(c * width / 32) * 32 for c in config["block_out_channels"]]
    config["cross_attention_dim"] = pipe.text_encoder.config.hidden_size
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel.from_config(config)
    pipe.register_modules(unet=pipe.unet)
    pipe.save_pretrained(folder, safe_serialization=True)


def rank_main(rank: int, world: int, port: int, folder: str, out: str, backend_name: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    import torch.distributed as dist
    # the modules a set-up imports, imported before the measurement starts: what is measured is the tensors
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    from bigsid.config import load_config
    from bigsid.models import build_networks
    from bigsid.parallel import build_backend
    from bigsid.parallel.dist import leave_process_group

    cfg = load_config(None, ["teacher.kind=diffusers", f"teacher.path={folder}", *BACKENDS[backend_name],
                             "train.precision=bf16", "train.device=cpu", "train.batch_size=2"])
    backend = build_backend(cfg)
    place, placed = backend.place, []
    backend.place = lambda *args, **kwargs: (place(*args, **kwargs), placed.append(status_kib("VmHWM")))
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = status_kib("VmRSS")
    torch.manual_seed(cfg.train.seed)
    networks = build_networks(cfg)
    backend.prepare(networks)
    peak = status_kib("VmHWM")

    def local_bytes(*nets):
        # a sharded tensor's local shard; a ZeRO-3 parameter's own partition (ds_tensor)
        local = (getattr(p, "ds_tensor", p) for net in nets for p in net.parameters())
        return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in local)

    Path(f"{out}.rank{rank}").write_text(json.dumps({
        "rank": rank, "setup_peak_growth_bytes": (peak - start) * 1024,
        "placed_peak_growth_bytes": (placed[0] - start) * 1024,
        "trained_local_param_bytes": local_bytes(networks.generator, networks.fake_score),
        "teacher_local_param_bytes": local_bytes(networks.teacher)}))
    leave_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="names this row, e.g. before or after")
    parser.add_argument("--code", required=True, help="the version of bigsid measured, e.g. its commit")
    parser.add_argument("--backend", choices=BACKENDS, default="fsdp2", help="zero3: DeepSpeed ZeRO stage 3")
    parser.add_argument("--width", type=float, default=1.0, help="channel widths x this (1: SD1.5's, 860 M)")
    parser.add_argument("--folder", default="/tmp/bigsid_bench_loading", help="where the pipeline is written")
    parser.add_argument("--results", default=None, help="results file (default benchmarks/results/loading_<machine>.json)")
    args = parser.parse_args()
    machine = f"cpu-{platform.machine()}-{os.cpu_count()}-cores"
    folder = Path(args.folder) / f"width{args.width:g}"
    if not folder.exists():
        write_pipeline(folder, args.width)
    with safe_open(str(folder / "unet/diffusion_pytorch_model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(folder / f"report.{args.backend}.{args.label}")
    mp.start_processes(rank_main, args=(2, port, str(folder), out, args.backend), nprocs=2, start_method="spawn")
    ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(2)]
    backend = {"fsdp2": "fsdp2", "zero3": "deepspeed zero3"}[args.backend]
    row = {"label": args.label, "code": args.code, "unet_params": params, "unet_fp32_bytes": 4 * params,
           "width": args.width, "world_size": 2, "backend": backend, "precision": "bf16", "ranks": ranks,
           "machine": machine, "torch": torch.__version__}
    results = Path(args.results or ROOT / f"benchmarks/results/loading_{machine}.json")
    rows = json.loads(results.read_text()) if results.exists() else []
    key = ("label", "width", "backend")
    rows = [r for r in rows if [r[k] for k in key] != [row[k] for k in key]] + [row]
    results.write_text(json.dumps(rows, indent=1) + "\n")
    gib = 2**30
    for r in ranks:
        print(f"{args.backend} {args.label}: rank {r['rank']}: peak host memory growth at set-up "
              f"{r['setup_peak_growth_bytes'] / gib:.2f} GiB, {r['placed_peak_growth_bytes'] / gib:.2f} GiB once "
              f"placed (one fp32 UNet: {4 * params / gib:.2f} GiB)")


if __name__ == "__main__":
    main()
