"""Throughput of evaluation: images/s of one-step generation and of each metric's network, at stated batch sizes.

Real-size networks with random weights (throughput does not depend on the weights): the SD1.5 UNet
(bigsid/unet_configs/sd15.json) with an SD VAE decoder at 512 px and a CLIP ViT-L/14 text encoder, run once per image
as a one-step generator's export runs; the FID Inception-v3 (torchvision's architecture, traced to TorchScript as
clean-fid's file is, fed through evaluation.fid's resize); CLIP ViT-g-14 (CLIP score) and ViT-L/14 (aesthetic score,
with the LAION head) built from transformers configs of those architectures, through evaluation.clip. The resize
to 256 and 299 px runs on the CPU and is part of each metric's time, as in an evaluation.

    python benchmarks/bench_eval.py                      # GPU if present, else CPU (small counts)
    python benchmarks/bench_eval.py --only generation fid --batch 16

Results go to benchmarks/results/eval_<device>.md with the machine."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluation  # noqa: E402,F401  (first: torchvision where its compiled operators do not load)
from evaluation import clip  # noqa: E402
from evaluation.fid import Inception  # noqa: E402
from evaluation.settings import FIDSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VIT_L14 = dict(text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
               vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14), projection_dim=768)
VIT_G14 = dict(text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
               vision=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=40, num_attention_heads=16,
                           image_size=224, patch_size=14), projection_dim=1024)


def timed(fn, batches: int, device: torch.device) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / batches


def images(n: int, size: int = 512) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def bench_generation(batch: int, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.image_processor import VaeImageProcessor
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_config(json.loads((ROOT / "bigsid/unet_configs/sd15.json").read_text()))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77))
    for m in (unet, vae, text):
        m.to(device, dtype).eval()
    tokens = torch.zeros(batch, 77, dtype=torch.long, device=device)
    t = torch.full((batch,), 625, device=device)

    @torch.no_grad()
    def step():
        emb = text(tokens)[0]
        x0 = unet(torch.randn(batch, 4, 64, 64, device=device, dtype=dtype), t, emb).sample
        decoded = vae.decode(x0 / 0.18215).sample.float()
        VaeImageProcessor().postprocess(decoded, output_type="pil")
    return step, "SD1.5 UNet once + SD VAE decode at 512 px + CLIP-L text encoder, random weights, PIL output"


def bench_fid(batch: int, device: torch.device, dtype: torch.dtype, tmp: Path):
    import torchvision

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
            net.fc = torch.nn.Identity()
            self.layers = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    torch.jit.trace(Wrapped().eval(), torch.zeros(1, 3, 299, 299)).save(str(tmp / "inception.pt"))
    inception = Inception(FIDSettings(inception=str(tmp / "inception.pt")), device)
    batch_images = images(batch)
    return (lambda: inception.features(batch_images)), ("Inception-v3 (torchvision architecture, TorchScript), "
                                                        "512 px -> crop/Lanczos 256 -> bicubic 299 on the CPU, fp32")


def _clip_folder(tmp: Path, name: str, spec: dict) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp / name
    CLIPModel(CLIPConfig(text_config=spec["text"], vision_config=spec["vision"],
                         projection_dim=spec["projection_dim"])).save_pretrained(folder)
    from bigsid.tiny import byte_level_clip_tokenizer

    byte_level_clip_tokenizer(folder, max_length=77)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def bench_clip(batch: int, device: torch.device, dtype: torch.dtype, tmp: Path):
    from evaluation.settings import EvalSettings

    settings = EvalSettings()
    settings.clip.backend, settings.clip.weights = "transformers", str(_clip_folder(tmp, "g14", VIT_G14))
    score = clip.CLIPScore(settings, device, False)
    batch_images = images(batch)
    return (lambda: score.update(batch_images, ["a photo of a cat"] * batch)), \
        "CLIP ViT-g-14 architecture (transformers, random weights), image + prefixed caption, fp32"


def bench_aesthetic(batch: int, device: torch.device, dtype: torch.dtype, tmp: Path):
    from evaluation.settings import EvalSettings

    torch.save(clip.AestheticHead().state_dict(), tmp / "head.pth")
    settings = EvalSettings()
    settings.aesthetic.backend = "transformers"
    settings.aesthetic.weights, settings.aesthetic.head = str(_clip_folder(tmp, "l14", VIT_L14)), str(tmp / "head.pth")
    score = clip.AestheticScore(settings, device, False)
    batch_images = images(batch)
    return (lambda: score.update(batch_images, [""] * batch)), \
        "CLIP ViT-L/14 architecture image tower (transformers, random weights) + LAION head, fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=None, help="default: 16 on a GPU, 2 on a CPU")
    parser.add_argument("--batches", type=int, default=None, help="timed batches (default: 10 on a GPU, 2 on a CPU)")
    parser.add_argument("--only", nargs="+", default=["generation", "fid", "clip", "aesthetic"])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    batch, batches = args.batch or (16 if gpu else 2), args.batches or (10 if gpu else 2)
    torch.set_grad_enabled(False)
    name = torch.cuda.get_device_name(device) if gpu else \
        f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for what in args.only:
            if what == "generation":
                fn, note = bench_generation(batch, device, torch.bfloat16 if gpu else torch.float32)
            else:
                fn, note = {"fid": bench_fid, "clip": bench_clip, "aesthetic": bench_aesthetic}[what](
                    batch, device, torch.float32, Path(tmp))
            seconds = timed(fn, batches, device)
            rows.append((what, batch, batch / seconds, note + (", bf16" if what == "generation" and gpu else "")))
            print(f"{what}: {batch / seconds:.2f} images/s at batch {batch}", flush=True)
    tag = "gpu-" + name.replace(" ", "-") if gpu else f"cpu-{platform.machine()}-{os.cpu_count()}-cores"
    out = RESULTS / f"eval_{tag}.md"
    vision = sys.modules.get("torchvision")
    lines = [f"# bench_eval on {name}", "", f"torch {torch.__version__}"
             + (f", torchvision {vision.__version__}" if vision else "") + f", {time.strftime('%Y-%m-%d')}, "
             f"{batches} timed batches after one warm-up; load average at start {os.getloadavg()[0]:.1f} "
             "(a shared machine: other jobs ran meanwhile).", "",
             "| stage | batch | images/s | what |", "| --- | --- | --- | --- |"]
    lines += [f"| {w} | {b} | {r:.3f} | {n} |" for w, b, r, n in rows]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
