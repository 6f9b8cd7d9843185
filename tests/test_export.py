"""Export for diffusers: stock diffusers loads the folder and its one-step call gives bigsid's own samples.

Latents are compared in fp32 with atol 1e-5 (measured differences are ~1e-6: the stock scheduler computes
sigma * z / sqrt(sigma^2 + 1) and sample - sigma * eps where bigsid computes s * z and (x_t - s * eps) / a), images
in [0, 1] with the same tolerance."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bigsid import checkpoint
from bigsid.cli import main
from bigsid.config import GMMConfig, load_config, to_dict
from bigsid.export import (ExportError, export, load_distilled, load_generator_state, sample_latents,
                           sampling_timesteps)
from bigsid.models import OneStepGenerator, load_diffusers_teacher
from bigsid.toy import prepare_toy_teacher
from conftest import TINY_TOY

GMM_CFG = GMMConfig(num_prompts=2, modes_per_prompt=2, latent_shape=[4, 4, 4])
PROMPTS = ["toy prompt 0", "toy prompt 1", "a photo of a cat"]
ATOL = 1e-5


def overrides(teacher_dir, run_dir, *extra):
    # ema_rampup=0: a 500-image half-life keeps the EMA visibly apart from the raw weights after two steps.
    return [*TINY_TOY, "teacher.kind=diffusers", f"teacher.path={teacher_dir}", f"train.run_dir={run_dir}",
            "train.batch_size=4", "train.total_nimg=8", "eval.num_samples=16", "train.ema_rampup=0", *extra]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return prepare_toy_teacher(tmp_path_factory.mktemp("t") / "teacher", GMM_CFG, fit_steps=5)


@pytest.fixture(scope="module")
def run_dir(teacher_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "-", *overrides(teacher_dir, run)]) == 0
    return run


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "sid-toy"
    assert main(["export", str(run_dir), str(out)]) == 0
    return out


def card_code(folder) -> str:
    return re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)


def run_card(folder):
    """Execute the model card's Python as a user would; return its pipeline."""
    scope = {}
    exec(card_code(folder), scope)
    return scope["pipe"]


def noise(n, seed=7):
    return torch.randn(n, 4, 4, 4, generator=torch.Generator().manual_seed(seed))


def bigsid_latents(d, prompts, z, steps=1):
    return sample_latents(d.generator, z, d.encoder(prompts).emb, sampling_timesteps(d.scheduler, steps))


def write_checkpoint(run_dir, generator, config, step=3):
    """A complete checkpoint in the local backend's layout (EMA = the trained weights), for generators built by
    hand."""
    partial = checkpoint.begin(run_dir, step)
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, partial / "generator.safetensors")
    trained = {n: p.detach().clone() for n, p in generator.named_parameters() if p.requires_grad}
    save_file(trained, partial / "ema.safetensors")
    return checkpoint.commit(partial, {"step": step, "nimg": 4 * step, "config": config}, keep=1)


def perturbed_generator(teacher_dir, prediction_type=""):
    net, schedule, *_ = load_diffusers_teacher(str(teacher_dir), prediction_type=prediction_type)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return OneStepGenerator(net, schedule, 625)


def test_stock_pipeline_called_as_the_card_says_gives_bigsid_samples(run_dir, exported):
    from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionPipeline

    files = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json",
            "README.md"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".ckpt"))]
    assert not (exported.parent / "sid-toy.partial").exists()

    pipe = run_card(exported)  # DiffusionPipeline.from_pretrained(folder): no custom code, no trust_remote_code
    assert type(pipe) is StableDiffusionPipeline and type(pipe.scheduler) is EulerDiscreteScheduler
    assert "num_inference_steps=1, guidance_scale=0" in card_code(exported)

    d = load_distilled(run_dir)
    z = noise(len(PROMPTS))
    with torch.no_grad():
        ours = d.generator(z, d.encoder(PROMPTS).emb)  # bigsid's own one-step sampler
        images = (d.vae.decode(ours / d.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    stock = pipe(PROMPTS, num_inference_steps=1, guidance_scale=0, generator=torch.Generator().manual_seed(7),
                 output_type="latent").images
    torch.testing.assert_close(stock, ours, atol=ATOL, rtol=0)
    stock_images = pipe(PROMPTS, num_inference_steps=1, guidance_scale=0, generator=torch.Generator().manual_seed(7),
                        output_type="pt").images
    torch.testing.assert_close(stock_images, images, atol=ATOL, rtol=0)

    # EMA by default: the exported UNet holds the EMA weights, which two steps keep apart from the raw ones.
    unet = DiffusionPipeline.from_pretrained(exported).unet.state_dict()
    ckpt = checkpoint.latest_checkpoint(run_dir)
    ema, raw = load_file(ckpt / "ema.safetensors"), load_file(ckpt / "generator.safetensors")
    for name, value in ema.items():
        assert torch.equal(unet[name.removeprefix("net.unet.")], value)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)


def test_model_card_records_the_run(run_dir, exported):
    text = (exported / "README.md").read_text()
    metrics = json.loads((run_dir / "eval" / "toy_metrics.json").read_text())
    assert "library_name: diffusers" in text and "pipeline_tag: text-to-image" in text
    assert "SiD (Score identity Distillation)" in text and "kappa4=1.0" in text and "t_init = 625" in text
    assert "| images seen | 8 (step 2, batch 4" in text and "| weights | EMA |" in text
    assert f"| this generator | {metrics['fd_generator']:.4f} |" in text
    assert "0.9286 * z" in text  # the generator's input the stock call reproduces


def test_raw_export_and_no_overwrite_without_force(run_dir, exported, tmp_path, capsys):
    out = tmp_path / "raw"
    assert main(["export", str(run_dir), str(out), "--raw"]) == 0
    raw = load_file(checkpoint.latest_checkpoint(run_dir) / "generator.safetensors")
    unet = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(unet[k.removeprefix("net.unet.")], v) for k, v in raw.items())
    assert "| weights | raw (not the EMA) |" in (out / "README.md").read_text()

    (out / "mine.txt").write_text("keep me")
    assert main(["export", str(run_dir), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep me" and not (tmp_path / "raw.partial").exists()
    assert main(["export", str(run_dir), str(out), "--force"]) == 0
    assert not (out / "mine.txt").exists()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (exported / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_v_prediction_teacher_and_few_steps(teacher_dir, tmp_path):
    from diffusers import DiffusionPipeline

    v_pred = overrides(teacher_dir, tmp_path / "run", "teacher.prediction_type=v_prediction")
    config = to_dict(load_config(None, v_pred))
    generator = perturbed_generator(teacher_dir, "v_prediction")
    write_checkpoint(tmp_path / "run", generator, config)
    out = export(tmp_path / "run", tmp_path / "out", steps=3)
    assert "num_inference_steps=3, guidance_scale=0" in card_code(out)
    pipe = DiffusionPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"

    d = load_distilled(tmp_path / "run")
    z = noise(len(PROMPTS))
    with torch.no_grad():
        assert torch.equal(bigsid_latents(d, PROMPTS, z), d.generator(z, d.encoder(PROMPTS).emb))
    for steps, timesteps in ((1, [625]), (2, [625, 312]), (3, [625, 416, 208])):
        assert sampling_timesteps(d.scheduler, steps) == timesteps
        stock = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=0, latents=z, output_type="latent").images
        torch.testing.assert_close(stock, bigsid_latents(d, PROMPTS, z, steps), atol=ATOL, rtol=0)


def test_sample_from_checkpoint_and_from_export_agree(run_dir, exported, tmp_path):
    for steps in ("1", "2"):
        for name, model in (("ckpt", run_dir), ("export", exported)):
            assert main(["sample", str(model), "--prompts", "toy prompt 0", "a cat", "--seeds", "2",
                         "--steps", steps, "--out", str(tmp_path / f"{name}{steps}")]) == 0
        names = sorted(p.name for p in (tmp_path / f"ckpt{steps}").iterdir())
        assert names == ["000-0.png", "000-1.png", "001-0.png", "001-1.png", "grid.png"]
        for n in names:
            a = np.asarray(Image.open(tmp_path / f"ckpt{steps}" / n), dtype=np.int16)
            b = np.asarray(Image.open(tmp_path / f"export{steps}" / n), dtype=np.int16)
            assert a.shape == b.shape and np.abs(a - b).max() <= 1  # uint8 rounding of equal images
    assert Image.open(tmp_path / "ckpt1" / "grid.png").size == (2 * 8, 2 * 8)
    one = np.asarray(Image.open(tmp_path / "ckpt1" / "000-0.png"))
    assert not np.array_equal(one, np.asarray(Image.open(tmp_path / "ckpt2" / "000-0.png")))

    before = (tmp_path / "ckpt1" / "000-0.png").read_bytes()
    assert main(["sample", str(run_dir), "--prompts", "another", "--out", str(tmp_path / "ckpt1")]) == 2
    assert (tmp_path / "ckpt1" / "000-0.png").read_bytes() == before
    assert main(["sample", str(run_dir), "--prompts", "another", "--seeds", "1", "--force",
                 "--out", str(tmp_path / "ckpt1")]) == 0
    assert sorted(p.name for p in (tmp_path / "ckpt1").iterdir()) == ["000-0.png", "grid.png"]


def test_lora_generator_exports_as_lora_and_fused(teacher_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from diffusers import DiffusionPipeline

    config = to_dict(load_config(None, overrides(teacher_dir, tmp_path / "run")))
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    # The LoRA settings training records (see bigsid.models.lora_config); alpha != rank, so the scale must travel.
    config["generator"] |= {"lora_rank": 4, "lora_alpha": 8, "lora_target_modules": targets}
    net, schedule, *_ = load_diffusers_teacher(str(teacher_dir))
    net.requires_grad_(False)
    net.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    generator = OneStepGenerator(net, schedule, 625)
    with torch.no_grad():
        for p in generator.parameters():
            if p.requires_grad:  # the adapter only; lora_B starts at zero, so give it something to carry
                p.normal_(0, 0.3)
    write_checkpoint(tmp_path / "run", generator, config)

    out = export(tmp_path / "run", tmp_path / "lora")
    assert {p.name for p in out.iterdir()} == {"pytorch_lora_weights.safetensors", "scheduler", "README.md"}
    pipe = run_card(out)  # teacher + this scheduler + load_lora_weights, as the card says
    d = load_distilled(tmp_path / "run")
    z = noise(len(PROMPTS))
    with torch.no_grad():
        ours = d.generator(z, d.encoder(PROMPTS).emb)
    stock = pipe(PROMPTS, num_inference_steps=1, guidance_scale=0, latents=z, output_type="latent").images
    torch.testing.assert_close(stock, ours, atol=ATOL, rtol=0)
    for name, model in (("from_lora", out), ("from_ckpt", tmp_path / "run")):
        assert main(["sample", str(model), "--prompts", "a cat", "--seeds", "1", "--out", str(tmp_path / name)]) == 0
    a, b = (np.asarray(Image.open(tmp_path / n / "000-0.png"), dtype=np.int16) for n in ("from_lora", "from_ckpt"))
    assert np.abs(a - b).max() <= 1

    fused = export(tmp_path / "run", tmp_path / "fused", fuse_lora=True)
    pipe = DiffusionPipeline.from_pretrained(fused)
    assert not [k for k in pipe.unet.state_dict() if "lora" in k or "base_layer" in k]
    stock = pipe(PROMPTS, num_inference_steps=1, guidance_scale=0, latents=z, output_type="latent").images
    # W + s B A summed into one weight rounds differently in fp32 from the adapter applied beside W
    torch.testing.assert_close(stock, ours, atol=10 * ATOL, rtol=0)

    # Weights outside the adapter that moved away from the teacher's cannot travel in a LoRA file.
    with torch.no_grad():
        generator.net.unet.conv_in.weight.add_(0.1)
    write_checkpoint(tmp_path / "run2", generator, config)
    with pytest.raises(ExportError, match="--fuse-lora"):
        export(tmp_path / "run2", tmp_path / "lora2")
    assert not (tmp_path / "lora2").exists()


def test_bad_sources_are_refused_with_what_to_change(teacher_dir, run_dir, tmp_path, capsys):
    def refused(args, *words):
        assert main(["export", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
        assert not (tmp_path / "out").exists()

    refused([tmp_path / "missing", tmp_path / "out"], "no such run directory")
    (tmp_path / "empty" / "checkpoints" / "step-000000002.partial").mkdir(parents=True)
    refused([tmp_path / "empty", tmp_path / "out"], "no complete checkpoint", "interrupted")

    toy = to_dict(load_config(None, [*TINY_TOY, f"train.run_dir={tmp_path / 'toy'}"]))
    write_checkpoint(tmp_path / "toy", torch.nn.Linear(2, 2), toy)
    refused([tmp_path / "toy", tmp_path / "out"], "toy_gmm", "teacher.kind=diffusers")

    xl = tmp_path / "xl"
    xl.mkdir()
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    refused([run_dir, tmp_path / "out", "--teacher", xl], "StableDiffusionXLPipeline", "Stable Diffusion 1.x/2.x")

    config = to_dict(load_config(None, overrides(teacher_dir, tmp_path / "other")))
    generator = perturbed_generator(teacher_dir)
    generator.net.unet.conv_in = torch.nn.Conv2d(4, 16, 3, padding=1)  # a network of another shape
    write_checkpoint(tmp_path / "other", generator, config)
    refused([tmp_path / "other", tmp_path / "out"], "does not fit", "conv_in.weight", "--teacher")

    refused([run_dir, run_dir, "--force"], "choose an output folder outside it")
    refused([run_dir, tmp_path / "out", "--steps", "0"], "steps=0")
    with pytest.raises(ExportError, match="no generator weights"):
        load_generator_state(tmp_path)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_checkpoint_exports_as_the_same_weights_on_one_process(run_dir, exported, tmp_path):
    """The FSDP2 backend's torch.distributed.checkpoint layout ({"generator": {"model"}, "ema"}), written here on one
    process from the local checkpoint's weights, exports to the same UNet."""
    import torch.distributed.checkpoint as dcp

    local = checkpoint.latest_checkpoint(run_dir)
    folder = checkpoint.begin(tmp_path / "sharded", 2)
    state = {"generator": {"model": load_file(local / "generator.safetensors")},
             "ema": load_file(local / "ema.safetensors")}
    dcp.save(state, checkpoint_id=str(folder / "dcp"), no_dist=True)
    checkpoint.commit(folder, checkpoint.read_state(local), keep=1)
    for ema in (True, False):
        sharded, single = load_generator_state(folder.with_suffix(""), ema), load_generator_state(local, ema)
        assert sharded.keys() == single.keys() and all(torch.equal(sharded[k], single[k]) for k in single)
    out = export(tmp_path / "sharded", tmp_path / "out")
    a = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(exported / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_a_few_step_run_trains_its_chain_and_exports_with_its_step_count(teacher_dir, tmp_path):
    from diffusers import DiffusionPipeline

    from bigsid.trainer import Trainer

    run = tmp_path / "run"
    tr = Trainer(load_config(None, overrides(teacher_dir, run, "train.total_nimg=24", "generator.steps=3")))
    ks = []
    inner = tr.train_step

    def record():
        metrics = inner()
        ks.append(tr.k)
        return metrics

    tr.train_step = record
    tr.run()
    assert set(ks) <= {1, 2, 3} and len(set(ks)) > 1  # random prefixes of the 3-step chain
    out = export(run, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "num_inference_steps=3" in card
    d = load_distilled(run)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    emb = d.encoder(["toy prompt 0"]).emb
    pipe = DiffusionPipeline.from_pretrained(out)
    stock = pipe("toy prompt 0", latents=z * 1.0, num_inference_steps=3, guidance_scale=0, output_type="latent").images
    torch.testing.assert_close(stock, sample_latents(d.generator, z, emb, d.generator.timesteps(3)), rtol=0, atol=1e-5)
