"""Export for diffusers: stock diffusers loads the folder and its one-step call gives bigsid's own samples.

A stock call is checked one UNet call at a time against bigsid's chain: the same timestep and prompt embeddings,
the input bigsid computes, and the output converted as bigsid converts it. Each fp32 value is compared to a bound
from the rounding of the few operations both sides compute it with (`assert_stock_call_is_bigsids`), never to a
fixed tolerance: the UNet itself is the same network, which an end-to-end comparison would only blur with its
sensitivity to the last bit of its input."""

import contextlib
import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bigsid import checkpoint
from bigsid.cli import main
from bigsid.config import load_config, to_dict
from bigsid.diffusion import SD_SCHEDULER_CONFIG, ScheduleError, VPSchedule
from bigsid.export import (ExportError, export, load_distilled, load_generator_state, one_step_scheduler,
                           sampling_timesteps, stock_call)
from bigsid.families import decode, load_teacher
from bigsid.models import OneStepGenerator
from conftest import TINY_TOY

PROMPTS = ["toy prompt 0", "toy prompt 1", "a photo of a cat"]
U = 2.0 ** -24  # fp32 unit roundoff


def overrides(teacher_dir, run_dir, *extra):
    # ema_rampup=0: a 500-image half-life keeps the EMA visibly apart from the raw weights after two steps.
    return [*TINY_TOY, "teacher.kind=diffusers", f"teacher.path={teacher_dir}", f"train.run_dir={run_dir}",
            "train.batch_size=4", "train.total_nimg=8", "eval.num_samples=16", "train.ema_rampup=0", *extra]


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


@contextlib.contextmanager
def network_calls(network):
    """Records each call of a family's network (UNet or transformer) as (input, timestep, the conditioning it got by
    Cond field name, the output's first C channels: PixArt's learned variance follows and is never used)."""
    calls = []

    def record(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        t = torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).flatten()
        assert (t == t[0]).all(), "one timestep for the whole batch"
        added = kwargs.get("added_cond_kwargs") or {}
        size = added.get("time_ids")
        if added.get("resolution") is not None:  # PixArt-alpha's micro-conditions: Cond.size is (h, w, h / w)
            size = torch.cat([added["resolution"], added["aspect_ratio"]], 1)
        fields = {"emb": kwargs["encoder_hidden_states"], "mask": kwargs.get("encoder_attention_mask"),
                  "pooled": added.get("text_embeds", kwargs.get("pooled_projections")), "size": size}
        calls.append((x.detach().clone(), t[0].clone(), {k: v.detach().clone() for k, v in fields.items()
                                                         if v is not None}, output[0][:, :x.shape[1]].detach().clone()))

    hook = network.register_forward_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


# Both sides compute each network input and the final sample from the same fp32 schedule. On a VP schedule bigsid
# computes a * x0 + s * eps and (x_t - s * pred) / a (or a * x_t - s * v), the Euler scheduler works in sigma space
# (sigma = s / a, its input sample / sqrt(sigma^2 + 1), x0 = sample - sigma * eps, sample + (sample - x0) / sigma *
# dt). Every value either computes on the way, coefficients included, is a combination with coefficients <= 1 of
# x_t / a, sigma * pred and pred (a, s, 1 / sqrt(sigma^2 + 1) <= 1, |dt| <= sigma), so it is at most 2M, M the sum
# of their magnitudes. On a flow schedule (a + s = 1, a = 0 at pure noise) bigsid computes x0 = (x_t - s v) / (a + s),
# eps = (x_t - a x0) / s and a' x0 + s' eps, the flow Euler step x + (sigma' - sigma) v with its own fp32 sigmas
# (shift u / (1 + (shift - 1) u): 5 operations, against bigsid's one rounding of a float64 sigma): every value is a
# combination with coefficients <= 1 of x_t and v, so M = |x_t| + |v| (eps's division by s is undone by s' <= s
# before anything is compared). Each side takes at most OPS fp32 operations per value, each within u of its result:
# the Euler step of a VP v-prediction chain is the longest (sigma from alphas_cumprod 4, input scaling 4, x0 6,
# derivative 2, dt 1, step 2, the initial scaling 1); bigsid's takes 11, a flow step at most 13 on either side. So
# the two agree to 2 * OPS * u * 2M (first order); a flow network's timestep sigma * 1000 (6 operations on the stock
# side, 1 on bigsid's) to the same bound with M = the timestep.
OPS = 20


def assert_chain(generator, z, cond, latents, calls, ops=OPS, same_network=True):
    """`calls` and `latents` are the generator's chain from z: at each of its timesteps the network on the prompts'
    conditioning and on the input bigsid computes from the previous call, the last output converted to the sample as
    bigsid converts it; each to the rounding of `ops` fp32 operations a side (0: bit for bit). `same_network`: the
    network is the generator's (same weights and kernels), so on the same input it returns the same bits."""
    schedule, net = generator.schedule, generator.net
    flow = net.prediction_type == "flow"
    timesteps = generator.timesteps(len(calls))

    def within_rounding(actual, expected, magnitude, what):
        err, bound = (actual.double() - expected.double()).abs(), 4 * ops * U * magnitude.double()
        assert (err <= bound).all(), f"{what}: off by {err.max():.3g}, more than the rounding of {ops} fp32 operations"

    a, s = schedule.a[timesteps[0]], schedule.s[timesteps[0]]
    expected = s * z
    magnitude = expected.abs() if flow else expected.abs() / a
    for i, (x_t, t_net, fields, out) in enumerate(calls):
        t = torch.full((len(z),), timesteps[i])
        within_rounding(t_net, schedule.timestep(t[0]), schedule.timestep(t[0]).abs(), f"timestep at t={t[0]}")
        assert fields.keys() >= {"emb"} and all(torch.equal(v, getattr(cond, k)) for k, v in fields.items()), \
            "the prompts are encoded as bigsid encodes them"
        within_rounding(x_t, expected, magnitude, f"network input at t={t[0]}")
        if same_network:
            assert torch.equal(net(x_t, t_net.expand(len(z)), cond), out)
        x0 = schedule.convert(out, x_t, t, net.prediction_type, "sample")
        a, s = schedule.a[t[0]], schedule.s[t[0]]
        magnitude = x_t.abs() + out.abs() if flow else x_t.abs() / a + (1 + s / a) * out.abs()
        expected = x0 if i + 1 == len(calls) else schedule.add_noise(
            x0, schedule.convert(x0, x_t, t, "sample", "epsilon"), torch.full_like(t, timesteps[i + 1]))
    within_rounding(latents, expected, magnitude, "sample")


def network_of(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


@torch.no_grad()
def assert_stock_call_is_bigsids(d, pipe, prompts, z, steps=1, same_network=True, **call):
    """The stock call `pipe(prompts, **stock_call(...), **call)` for `steps` steps (`call` gives it z) runs the
    chain bigsid's generator runs; returns its latents."""
    cond = d.encoder(prompts)
    with network_calls(d.generator.net.network) as calls:
        ours = d.generator(z, cond, chain=steps)
    assert_chain(d.generator, z, cond, ours, calls, ops=0)  # the helper describes bigsid's sampler exactly
    arguments = stock_call(d.scheduler, steps, d.family.name, d.t5_length)
    with network_calls(network_of(pipe)) as calls:
        stock = pipe(prompts, output_type="latent", **arguments, **call).images
    assert len(calls) == steps
    assert_chain(d.generator, z, cond, stock, calls, same_network=same_network)
    return stock


def assert_fused_weights(adapted, fused: dict, u: float):
    """`fused` (a UNet state dict) holds W + s B A for each LoRA layer of the `adapted` UNet, and its other weights
    as they are. Fusing in precision u rounds B A, a sum of r products (r u sum_k |B_ik| |A_kj|), its scaling by s
    and the sum with W (u of each result): |fused - (W + s B A)| <= u (|W + s B A| + (r + 1) |s| |B| |A|)."""
    layers = {name: m for name, m in adapted.named_modules() if hasattr(m, "lora_A")}
    assert layers
    for name, m in layers.items():
        w, a, b = (t.double() for t in (m.base_layer.weight, m.lora_A["default"].weight, m.lora_B["default"].weight))
        scale, rank = m.scaling["default"], a.shape[0]
        exact = w + scale * b @ a
        bound = u * (exact.abs() + (rank + 1) * abs(scale) * b.abs() @ a.abs())
        assert ((fused[f"{name}.weight"].double() - exact).abs() <= bound).all(), name
    base = {k.replace(".base_layer", ""): v for k, v in adapted.state_dict().items() if "lora_" not in k}
    assert fused.keys() == base.keys()
    assert all(torch.equal(fused[k], v) for k, v in base.items() if k.removesuffix(".weight") not in layers)


def write_checkpoint(run_dir, generator, config, step=3):
    """A complete checkpoint in the local backend's layout (EMA = the trained weights), for generators built by
    hand."""
    partial = checkpoint.begin(run_dir, step)
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, partial / "generator.safetensors")
    trained = {n: p.detach().clone() for n, p in generator.named_parameters() if p.requires_grad}
    save_file(trained, partial / "ema.safetensors")
    # every key a train state has (checkpoint.read_state); the export reads only step, nimg and config
    state = {"step": step, "nimg": 4 * step, "skipped": {"nan_samples": 0, "nonfinite_steps": 0}, "data": {},
             "config": config}
    return checkpoint.commit(partial, state, keep=1)


def perturbed_generator(teacher_dir, prediction_type="", t_init=625):
    teacher = load_teacher(str(teacher_dir), prediction_type=prediction_type)
    net, schedule = teacher.denoiser, teacher.schedule
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return OneStepGenerator(net, schedule, t_init)


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
    def seeded():  # the stock call draws noise(3) itself
        return torch.Generator().manual_seed(7)

    stock = assert_stock_call_is_bigsids(d, pipe, PROMPTS, noise(len(PROMPTS)), generator=seeded())
    stock_images = pipe(PROMPTS, num_inference_steps=1, guidance_scale=0, output_type="pt", generator=seeded()).images
    with torch.no_grad():  # the teacher's VAE on the same latents: the same bits
        images = (decode(d.vae, stock) / 2 + 0.5).clamp(0, 1)
    assert torch.equal(stock_images, images)

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
    for steps, timesteps in ((1, [625]), (2, [625, 312]), (3, [625, 416, 208])):
        assert sampling_timesteps(d.scheduler, steps) == timesteps
        assert_stock_call_is_bigsids(d, pipe, PROMPTS, z, steps, latents=z)


def test_the_exported_scheduler_runs_the_generators_own_chain_or_the_export_refuses():
    """Every step count of a VP export either runs the generator's chain timesteps in the stock scheduler or is
    refused. t_init every 7 steps and 1..40 steps (5,000 pairs, hundreds of each kind) plus two cases np.arange's
    float arithmetic decides: at t_init=500 the point 250.50000000000006 rounds up, and at t_init=761, 11 steps, a
    last point 2.3e-13 becomes an extra timestep -1."""
    schedule = VPSchedule.from_scheduler_config(SD_SCHEDULER_CONFIG)
    outcomes = {"same": 0, "refused": 0}
    for t_init in [*range(1, 1000, 7), 500, 761]:
        scheduler = one_step_scheduler(SD_SCHEDULER_CONFIG, t_init, "epsilon")
        generator = OneStepGenerator(torch.nn.Identity(), schedule, t_init)
        for steps in range(1, min(t_init, 40) + 1):
            chain = generator.timesteps(steps)
            assert len(chain) == steps and chain[0] == t_init and chain[-1] >= 0
            assert all(a > b for a, b in zip(chain, chain[1:]))
            scheduler.set_timesteps(steps)
            if [int(t) for t in scheduler.timesteps] == chain:
                assert sampling_timesteps(scheduler, steps) == chain
                outcomes["same"] += 1
            else:
                with pytest.raises(ExportError, match=f"steps={steps}: .* ask for steps="):
                    sampling_timesteps(scheduler, steps)
                outcomes["refused"] += 1
    assert min(outcomes.values()) > 100, outcomes
    assert OneStepGenerator(torch.nn.Identity(), schedule, 500).timesteps(14)[6:8] == [285, 250]
    with pytest.raises(ExportError, match=r"timesteps \[761, .*, 68, -1\].*steps=10 or 12"):
        sampling_timesteps(one_step_scheduler(SD_SCHEDULER_CONFIG, 761, "epsilon"), 11)


def test_the_exported_scheduler_has_the_training_schedule():
    """The export's Euler cut runs on the betas training uses, bit for bit (abar is one fp32 cumulative product of
    the same values on both sides), sampler spacing settings included; a zero-terminal-SNR rescale, which training
    does not apply, is refused on both sides."""
    for config in (SD_SCHEDULER_CONFIG, {**SD_SCHEDULER_CONFIG, "_class_name": "EulerDiscreteScheduler",
                                         "use_karras_sigmas": True}):
        schedule = VPSchedule.from_scheduler_config(config)
        scheduler = one_step_scheduler(config, 625, "epsilon")
        assert torch.equal(scheduler.alphas_cumprod.double().sqrt().float(), schedule.a[:626])
    rescaled = {**SD_SCHEDULER_CONFIG, "rescale_betas_zero_snr": True}
    for build in (VPSchedule.from_scheduler_config, lambda config: one_step_scheduler(config, 625, "epsilon")):
        with pytest.raises(ScheduleError, match="rescale_betas_zero_snr=true"):
            build(rescaled)


def test_a_few_step_chain_no_export_runs_is_refused_before_training(teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "-", *overrides(teacher_dir, run, "generator.t_init=761", "generator.steps=11")]) == 2
    err = capsys.readouterr().err
    assert "generator.steps=11 with generator.t_init=761" in err and "choose generator.steps=10 or 12" in err
    assert not (run / "checkpoints").exists()


def test_sample_never_replaces_its_teacher(teacher_dir, tmp_path, capsys):
    """--force replaces an output folder, but not one that holds the teacher a sample reads: the run's own, or the
    one named with --teacher (a copy of the teacher both times, so that a failure costs no other test its
    teacher)."""
    models = tmp_path / "models"
    teacher = Path(shutil.copytree(teacher_dir, models / "teacher"))
    files = {p: p.read_bytes() for p in teacher.rglob("*") if p.is_file()}
    for run, trained_from in (("own", teacher), ("elsewhere", teacher_dir)):
        config = to_dict(load_config(None, overrides(trained_from, tmp_path / run)))
        write_checkpoint(tmp_path / run, perturbed_generator(teacher), config)
    for run, out, extra in (("own", teacher, []), ("own", models, []),
                            ("elsewhere", teacher, ["--teacher", str(teacher)])):
        assert main(["sample", str(tmp_path / run), "--prompts", "a cat", "--seeds", "1", "--force",
                     "--out", str(out), *extra]) == 2
        assert f"holds {teacher}, an input: choose an output folder outside it" in capsys.readouterr().err
        assert {p: p.read_bytes() for p in teacher.rglob("*") if p.is_file()} == files
    assert main(["sample", str(tmp_path / "own"), "--prompts", "a cat", "--seeds", "1",
                 "--out", str(tmp_path / "samples")]) == 0


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
    teacher = load_teacher(str(teacher_dir))
    net, schedule = teacher.denoiser, teacher.schedule
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
    # The file carries s B with s = alpha / rank = 2, a power of two: the stock adapter's (s B)(A x) and bigsid's
    # s (B (A x)) are the same bits, so the stock UNet is the generator's network exactly.
    assert_stock_call_is_bigsids(d, pipe, PROMPTS, z, latents=z)
    for name, model in (("from_lora", out), ("from_ckpt", tmp_path / "run")):
        assert main(["sample", str(model), "--prompts", "a cat", "--seeds", "1", "--out", str(tmp_path / name)]) == 0
    a, b = (np.asarray(Image.open(tmp_path / n / "000-0.png"), dtype=np.int16) for n in ("from_lora", "from_ckpt"))
    assert np.abs(a - b).max() <= 1

    fused = export(tmp_path / "run", tmp_path / "fused", fuse_lora=True)
    pipe = DiffusionPipeline.from_pretrained(fused)
    assert_fused_weights(d.generator.net.unet, pipe.unet.state_dict(), U)
    # The fused UNet is another fp32 network (W + s B A rounded into one weight), so only the stock scheduler's
    # arithmetic around it is compared; the network is, through the weights.
    assert_stock_call_is_bigsids(d, pipe, PROMPTS, z, same_network=False, latents=z)

    # The algebra in float64: fusing as the export does gives W + s B A and the adapter's network. Both hold to a
    # few roundings of 2^-53 ~ 1.1e-16 per value; 1e-12 (relative) leaves a factor 10^4 for the network's depth.
    adapter = copy.deepcopy(d.generator).double()
    merged = copy.deepcopy(adapter)
    merged.net.unet.fuse_lora()
    merged.net.unet.unload_lora()
    assert_fused_weights(adapter.net.unet, merged.net.unet.state_dict(), 1e-12)
    with torch.no_grad():
        cond = d.encoder(PROMPTS).to(torch.float64)
        expected, actual = adapter(z.double(), cond), merged(z.double(), cond)
    assert ((actual - expected).abs() <= 1e-12 * expected.abs().max()).all()

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

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    refused([run_dir, tmp_path / "out", "--teacher", odd], "KandinskyPipeline", "supported pipelines are",
            "StableDiffusion3Pipeline", "--teacher")

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
    assert_stock_call_is_bigsids(d, DiffusionPipeline.from_pretrained(out), ["toy prompt 0"], z, 3, latents=z)
