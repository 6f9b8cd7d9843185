"""Export for every teacher family: the teacher's own stock pipeline, loaded without custom code and called with
standard arguments only, runs bigsid's chain on the same noise (each network call checked as tests/test_export.py
checks SD's, with its fp32 rounding bound); images, `bigsid sample` and `bigsid eval` agree from checkpoint and
export; LoRA where the pipeline loads one; what no stock call can reproduce is refused."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from bigsid.cli import main
from bigsid.config import load_config, to_dict
from bigsid.export import ExportError, export, latent_shape, load_distilled, stock_call
from bigsid.families import decode, load_teacher
from bigsid.models import OneStepGenerator
from bigsid.tiny import build_pipeline
from conftest import TINY_TOY
from evaluation.settings import load_settings
from evaluation.sources import load_source
from test_export import assert_stock_call_is_bigsids, card_code, perturbed_generator, run_card, write_checkpoint
from test_families import save_tiny

# Mixed case and a trailing space: PixArt's pipeline lowercases and strips, and bigsid must encode as it does.
PROMPTS = ["A Photo of a Cat ", "two dogs"]
# bigsid.tiny's pipelines by name (`pixart` is PixArt-Sigma's)
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "pixart": "PixArtSigmaPipeline",
             "pixart_alpha": "PixArtAlphaPipeline", "sd3": "StableDiffusion3Pipeline"}
T_INIT = {"sdxl": 625, "pixart": 625, "pixart_alpha": 625, "sd3": 999}  # SiD's VP start; pure noise for flow
ALL = list(PIPELINES)


@pytest.fixture(scope="module", params=["sdxl", "pixart", "sd3"])
def family(request, tmp_path_factory):
    return request.param, save_tiny(request.param, tmp_path_factory.mktemp(request.param) / "teacher")


def run_config(folder, run_dir, *extra) -> dict:
    prompts = run_dir.parent / "prompts.txt"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("a red cube\ntwo cats on a sofa\n")
    return to_dict(load_config(None, [*TINY_TOY, "teacher.kind=diffusers", f"teacher.path={folder}",
                                      f"train.run_dir={run_dir}", "data.source=text", f"data.path={prompts}",
                                      *extra]))


def noise(n, seed=7):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def images(folder):
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.iterdir())}


def test_export_runs_in_the_familys_stock_pipeline_as_bigsid_does(family, tmp_path):
    name, folder = family
    t_init = T_INIT[name]
    config = run_config(folder, tmp_path / "run", f"generator.t_init={t_init}")
    write_checkpoint(tmp_path / "run", perturbed_generator(folder, t_init=t_init), config)
    out = export(tmp_path / "run", tmp_path / "export")

    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    network = "unet" if name == "sdxl" else "transformer"
    assert {"model_index.json", f"{network}/diffusion_pytorch_model.safetensors", "README.md",
            "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".ckpt"))]
    pipe = run_card(out)  # DiffusionPipeline.from_pretrained(folder), no trust_remote_code
    assert type(pipe).__name__ == PIPELINES[name]
    code = card_code(out)
    assert "num_inference_steps=1, guidance_scale=0" in code
    if name == "pixart":
        assert "use_resolution_binning=False, clean_caption=False, max_sequence_length=300" in code
    if name == "sd3":
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 3
        assert "max_sequence_length=256" in code
    else:
        assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"

    d = load_distilled(tmp_path / "run")
    z = noise(len(PROMPTS))
    for steps in (1, 3):  # 3: flow sigmas that fp32 does not hold exactly
        stock = assert_stock_call_is_bigsids(d, pipe, PROMPTS, z, steps, latents=z)
    # The VAE as the pipeline decodes (SD3's: latents / scaling_factor + shift_factor): the same bits.
    decoded = pipe(PROMPTS, latents=z, output_type="pt", **stock_call(d.scheduler, 3, name, d.t5_length)).images
    with torch.no_grad():
        assert torch.equal(decoded, (decode(d.vae, stock) / 2 + 0.5).clamp(0, 1))

    # `bigsid sample` and `bigsid eval`'s generation make the same images from the checkpoint (bigsid's chain) as
    # from the export (the stock pipeline): equal latents, equal images to uint8 rounding; sampling two steps,
    # evaluating the card's one.
    for source, model in (("ckpt", tmp_path / "run"), ("export", out)):
        assert main(["sample", str(model), "--prompts", *PROMPTS, "--seeds", "1", "--steps", "2",
                     "--out", str(tmp_path / f"from_{source}")]) == 0
    a, b = images(tmp_path / "from_ckpt"), images(tmp_path / "from_export")
    assert a.keys() == b.keys() == {"000-0.png", "001-0.png", "grid.png"}
    assert a["000-0.png"].shape == (64, 64, 3) and all(np.abs(a[k] - b[k]).max() <= 1 for k in a)
    bare = Path(shutil.copytree(out, tmp_path / "bare"))  # an export without its card: its family's call
    (bare / "README.md").unlink()
    settings = load_settings(["device=cpu"])
    made = [[np.asarray(im, dtype=np.int16) for im in load_source(str(source), settings).load()(PROMPTS, [3, 4])]
            for source in (tmp_path / "run", out, bare)]
    assert all(np.abs(x - y).max() <= 1 for other in made[1:] for x, y in zip(made[0], other))
    assert not np.array_equal(*made[0])


@pytest.mark.parametrize("name", ["pixart_alpha", "pixart_alpha_1024"])
def test_pixart_alpha_exports_into_its_own_pipeline(name, tmp_path):
    """PixArtAlphaPipeline, at its default 120 T5 tokens, runs bigsid's one- and three-step chains as
    PixArtSigmaPipeline does above (its single step takes the scheduler's x0, not its next sample), passing the
    1024 px model's transformer the resolution and aspect ratio bigsid conditions on (each call's checked bit for
    bit against the Cond). Latents only: the images go through the code the Sigma export's test covers."""
    folder = save_tiny(name, tmp_path / "teacher")
    config = run_config(folder, tmp_path / "run", "generator.t_init=625")
    write_checkpoint(tmp_path / "run", perturbed_generator(folder, t_init=625), config)
    out = export(tmp_path / "run", tmp_path / "export")
    assert "use_resolution_binning=False, clean_caption=False, max_sequence_length=120" in card_code(out)
    pipe = DiffusionPipeline.from_pretrained(out)  # the card's pipeline, its call made below
    assert type(pipe).__name__ == "PixArtAlphaPipeline" and type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.transformer.config.use_additional_conditions == (name == "pixart_alpha_1024")
    d = load_distilled(tmp_path / "run")
    z = torch.randn(len(PROMPTS), *latent_shape(pipe.transformer), generator=torch.Generator().manual_seed(7))
    for steps in (1, 3):
        assert_stock_call_is_bigsids(d, pipe, PROMPTS, z, steps, latents=z)


@pytest.mark.parametrize("family", ALL, indirect=True)
def test_the_teachers_own_sampler_runs_for_evaluation(family, tmp_path):
    name, folder = family
    settings = load_settings(["device=cpu", "sampler=teacher", "teacher_steps=2", "guidance=2"])
    source = load_source(str(folder), settings)
    flow = name == "sd3"
    assert source.default_name == ("teacher-euler2-cfg2" if flow else "teacher-ddim2-cfg2")
    assert source.record["sampler"] == ("Euler (flow matching)" if flow else "DDIM (eta 0)")
    made = source.load()(PROMPTS, [0, 1])
    assert [im.size for im in made] == [(64, 64)] * 2


@pytest.mark.parametrize("family", ALL, indirect=True)
def test_lora_generator_exports_where_the_pipeline_loads_lora(family, tmp_path):
    peft = pytest.importorskip("peft")

    name, folder = family
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    config = run_config(folder, tmp_path / "run", f"generator.t_init={T_INIT[name]}")
    config["generator"] |= {"lora_rank": 4, "lora_alpha": 8, "lora_target_modules": targets}
    teacher = load_teacher(str(folder))
    generator = OneStepGenerator(teacher.denoiser, teacher.schedule, T_INIT[name])
    if name.startswith("pixart"):  # diffusers gives PixArt's transformer no adapter: nothing to train or export
        write_checkpoint(tmp_path / "run", generator, config)
        with pytest.raises(ExportError, match="PixArtTransformer2DModel.*takes no LoRA adapter"):
            export(tmp_path / "run", tmp_path / "lora")
        return
    generator.net.network.requires_grad_(False)
    generator.net.network.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for p in generator.parameters():
            if p.requires_grad:  # lora_B starts at zero: give the adapter something to carry
                p.normal_(0, 0.3)
    write_checkpoint(tmp_path / "run", generator, config)
    out = export(tmp_path / "run", tmp_path / "lora")
    assert {p.name for p in out.iterdir()} == {"pytorch_lora_weights.safetensors", "scheduler", "README.md"}
    pipe = run_card(out)  # the teacher's pipeline, this scheduler, load_lora_weights
    assert type(pipe).__name__ == PIPELINES[name]
    d = load_distilled(tmp_path / "run")
    z = noise(len(PROMPTS))
    # s = alpha / rank = 2 travels in B (a power of two): the stock adapter is the generator's network bit for bit
    assert_stock_call_is_bigsids(d, pipe, PROMPTS, z, latents=z)
    fused = DiffusionPipeline.from_pretrained(export(tmp_path / "run", tmp_path / "fused", fuse_lora=True))
    assert_stock_call_is_bigsids(d, fused, PROMPTS, z, same_network=False, latents=z)


def test_flow_exports_few_steps_by_their_sigmas_and_refuses_what_no_stock_flow_call_runs(tmp_path):
    folder = tmp_path / "sd3"
    build_pipeline("sd3").save_pretrained(folder)
    config = run_config(folder, tmp_path / "run", "generator.t_init=999", "generator.steps=3")
    write_checkpoint(tmp_path / "run", perturbed_generator(folder, t_init=999), config)
    out = export(tmp_path / "run", tmp_path / "three")
    # the chain's grid times 999, 666, 332 (trailing), unshifted: the scheduler applies the teacher's shift
    assert "sigmas=[1.0, 0.667, 0.333], guidance_scale=0, max_sequence_length=256" in card_code(out)
    assert "these 3 `sigmas`" in (out / "README.md").read_text()
    run_card(out)  # the card's own call runs

    config = run_config(folder, tmp_path / "low", "generator.t_init=800")
    write_checkpoint(tmp_path / "low", perturbed_generator(folder, t_init=800), config)
    with pytest.raises(ExportError, match="generator.t_init=800.*starts every chain from z itself.*"
                                          "generator.t_init=999"):
        export(tmp_path / "low", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    # bigsid runs it as trained
    assert main(["sample", str(tmp_path / "low"), "--prompts", "a cat", "--seeds", "1",
                 "--out", str(tmp_path / "samples")]) == 0

    # A flow teacher read as predicting x0 keeps its own flow scheduler, which reads every output as the velocity:
    # no stock call runs that generator.
    config = run_config(folder, tmp_path / "x0", "generator.t_init=999", "teacher.prediction_type=sample")
    write_checkpoint(tmp_path / "x0", perturbed_generator(folder, "sample", t_init=999), config)
    assert type(load_distilled(tmp_path / "x0").scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(ExportError, match="predicts sample.*as the flow velocity.*teacher.prediction_type=flow"):
        export(tmp_path / "x0", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
