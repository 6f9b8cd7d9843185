"""The memory planner against measured bytes: real CPU runs of the trainer and of tiny networks of every family (a
UNet, PixArt and SD3 transformers), and the reference networks' parameter counts. Activations are measured by the
planner on the meta device at batch 1; the real runs here use other batches, real tensors and torch's own
autocast."""

import json
from pathlib import Path

import diffusers
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bigsid import plan
from bigsid.cli import main
from bigsid.config import GMMConfig, load_config
from bigsid.families import FAMILIES
from bigsid.toy import prepare_toy_teacher
from bigsid.trainer import Trainer
from conftest import TINY_TOY
from test_families import save_tiny

GUIDED = [f"objective.kappa{i}=1.5" for i in range(1, 5)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    gmm = GMMConfig(num_prompts=2, modes_per_prompt=2, latent_shape=[4, 8, 8])
    return prepare_toy_teacher(tmp_path_factory.mktemp("plan") / "teacher", gmm, fit_steps=1)


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    """Tiny PixArt and SD3 pipeline folders (bigsid.tiny; PixArt-alpha's with resolution and aspect-ratio
    conditioning too), as a teacher folder of those families is planned."""
    return {name: save_tiny(name, tmp_path_factory.mktemp(name) / "pipe")
            for name in ("pixart", "pixart_alpha_1024", "sd3")}


def storage_bytes(tensors) -> int:
    return sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}.values())


def test_reference_unets_have_their_published_sizes():
    assert plan.load_model("sd15").params == 859_520_964
    assert plan.load_model("sd21").params == 865_910_724
    sdxl = plan.load_model("sdxl")
    assert sdxl.params == 2_567_463_684 and sdxl.latent_size == 128
    _, units, root = sdxl.counts
    assert sum(units) + root == sdxl.params and units == sorted(units, reverse=True)
    # the shipped configs name hub ids: they plan offline through the presets
    spec = plan.load_model(cfg=load_config(Path(__file__).parents[1] / "configs" / "sd15_sid_lsg.yaml",
                                           check_data=False))
    assert spec.params == 859_520_964 and spec.latent_size == 64 and spec.text_tokens == 77


def test_reference_transformers_have_their_published_sizes():
    """PixArt-XL-2 (0.6 B) and SD3.5-medium's MM-DiT (2.24 B), their prompt lengths, and the shipped configs naming
    their hub ids planned offline through the presets."""
    alpha, sigma, sd35 = (plan.load_model(n) for n in ("pixart_alpha_512", "pixart_sigma_1024", "sd35_medium"))
    assert alpha.params == sigma.params == 610_856_096 and sd35.params == 2_243_171_520
    assert (alpha.text_tokens, sigma.text_tokens, sd35.text_tokens) == (120, 300, 77 + 256)
    assert (alpha.latent_size, sigma.latent_size, sd35.latent_size) == (64, 128, 128)
    # PixArt-alpha 1024: alpha 512's network plus its resolution and aspect-ratio embedders (each two linear
    # layers, 256 sinusoidal channels to a third of the width, 384, then 384 to 384)
    alpha_1024 = plan.load_model("pixart_alpha_1024")
    embedder = 256 * 384 + 384 + 384 * 384 + 384
    assert alpha_1024.params == alpha.params + 2 * embedder
    assert (alpha_1024.latent_size, alpha_1024.text_tokens) == (128, 120)
    conditioned = lambda spec: spec.network_config["use_additional_conditions"]  # noqa: E731
    assert conditioned(alpha_1024) and not conditioned(alpha) and not conditioned(sigma)
    hub = load_config(None, ["teacher.kind=diffusers", "teacher.path=PixArt-alpha/PixArt-XL-2-1024-MS"],
                      check_data=False)
    assert plan.load_model(cfg=hub).params == alpha_1024.params
    # FSDP2's units are the 24 joint blocks: 0-12 with a second image self-attention, the last one without the
    # text stream's output half (context_pre_only); the root keeps the embeddings and the output layer
    _, units, root = sd35.counts
    assert units == [units[0]] * 13 + [units[13]] * 10 + [units[23]] and units[0] > units[13] > units[23]
    assert sum(units) + root == sd35.params
    # SD3.5's positional-embedding table (384^2 x 1536) is a buffer on every rank
    assert sd35.buffers == 384 ** 2 * 1536
    configs = Path(__file__).parents[1] / "configs"
    for name, preset in (("pixart_alpha_sim", alpha), ("pixart_sigma_sid", sigma), ("sd35_medium_sid", sd35)):
        spec = plan.load_model(cfg=load_config(configs / f"{name}.yaml", check_data=False))
        assert (spec.family, spec.params, spec.latent_size) == (preset.family, preset.params, preset.latent_size)
        assert spec.text_params > 4.7e9  # T5-XXL's encoder


def test_live_memory_counts_each_new_storage_once_until_it_is_freed():
    existing = torch.zeros(1000)
    live = plan.LiveMemory()
    with live:
        existing.add_(1)  # in place on a storage from before: not new
        a = torch.ones(250)
        view = a[10:]  # shares a's storage
        b = a * 2
        del b
    assert live.now["activations"] == 1000 and live.peak == 2000
    del a
    assert view.untyped_storage().nbytes() == 1000 and live.now["activations"] == 1000
    del view
    assert live.now["activations"] == 0


# The planner overestimates the tiny PixArt's trained bf16 call by ~8% (an upper bound, cause not yet traced; the
# README says so): marked, strictly, so that the case reports itself once it is fixed.
KNOWN_OVERESTIMATE = pytest.mark.xfail(strict=True, reason="planner overestimates PixArt's trained bf16 call by ~8%")


def known(source, kind, checkpointing, bf16):
    return [KNOWN_OVERESTIMATE] if (source, kind, checkpointing, bf16) == ("pixart", "trained", False, True) else []


@pytest.mark.parametrize("source,batch,kind,checkpointing,bf16", [
    pytest.param(source, batch, kind, checkpointing, bf16, marks=known(source, kind, checkpointing, bf16))
    for source, batch in (("tiny", 4), ("pixart", 4), ("sd3", 1))
    for kind, checkpointing in (("trained", False), ("trained", True), ("input_grad", False), ("input_grad", True))
    for bf16 in (False, True)] + [("pixart_alpha_1024", 2, "trained", False, False),
                                  ("pixart_alpha_1024", 2, "input_grad", True, False)])
def test_meta_measurement_matches_a_real_forward_and_backward(pipeline_dirs, source, batch, kind, checkpointing,
                                                              bf16):
    """A tiny network of each family (the tiny UNet preset; PixArt and SD3 from their pipeline folders, at the
    prompt lengths their pipelines pad to; PixArt-alpha at 1024 px's latent size, conditioned on its resolution and
    aspect ratio) on the CPU, called through its family's denoiser with torch.autocast,
    against the planner's batch-1 meta measurement (CPU autocast policy) times the batch: activations are linear in
    the batch, and the meta run misses nothing. SD3 at batch 1: its trained call keeps some tensors once per call,
    not per sample (3% of this tiny network's activations), which the planner's per-sample scaling overcounts at a
    larger batch."""
    model = plan.load_model(source if source == "tiny" else str(pipeline_dirs[source]))
    network = getattr(diffusers, FAMILIES[model.family].network_class).from_config(model.network_config)
    denoiser = FAMILIES[model.family].denoiser(network, "epsilon")
    if checkpointing:
        network.enable_gradient_checkpointing()
    denoiser.requires_grad_(kind == "trained")
    live = plan.LiveMemory()
    for p in denoiser.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: live.reclassify(p.grad, "grads"))
    x, t, cond = plan.denoiser_inputs(denoiser, batch, model.latent_size, model.text_tokens, "cpu")
    x.requires_grad_(kind == "input_grad")
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16), live:
        out = denoiser(x, t, cond)
        kept = live.now["activations"]  # real autocast's weight copies are activations to this tracker
        out.backward(torch.ones_like(out))
    measured = plan.measure_call(model.family, model.config_json, model.latent_size, model.text_tokens, kind,
                                 checkpointing, bf16, "cpu")
    assert measured.kept * batch + measured.weight_copies == pytest.approx(kept, rel=0.01)
    # inside autocast's region a trained network's recomputation reuses the cached casts; a frozen one's casts again
    recast = measured.recast if kind == "input_grad" else 0
    planned = (measured.kept + measured.transient) * batch + measured.weight_copies + recast
    # Where the planner is an upper bound, by at most the bf16 weight copies involved: it holds a frozen call's
    # (graph_copies) until its backward ends, and adds the peak of a recomputation's casts to the activations' peak,
    # where the real backward frees the copies of the layers it has passed and its casts need not peak with its
    # activations; it measures a trained checkpointed backward with autocast's cache closed (the fake score's,
    # trainer.py), where inside the region the recomputation reuses the cached casts (weight_copies).
    slack = measured.graph_copies + recast if kind == "input_grad" else measured.weight_copies * checkpointing
    assert live.peak_activations * 0.98 <= planned <= (live.peak_activations + slack) * 1.02
    assert live.now["grads"] == (4 * sum(p.numel() for p in denoiser.parameters()) if kind == "trained" else 0)


@pytest.mark.parametrize("teacher,precision,checkpointing,lora", [
    ("toy", "fp32", "[]", 0), ("toy", "bf16", "[generator,fake_score,teacher]", 0), ("toy", "bf16", "[]", 4),
    # PixArt checkpointed in bf16: the estimate is 10% above the measured step, an upper bound, from the trained
    # recomputation's casts (test_meta_measurement_matches_a_real_forward_and_backward bounds it), not within 3%
    ("pixart", "fp32", "[]", 0), ("pixart", "bf16", "[]", 0),
    ("sd3", "fp32", "[]", 0), ("sd3", "bf16", "[generator,fake_score,teacher]", 0)])
def test_plan_matches_a_measured_training_step(teacher_dir, pipeline_dirs, tmp_path, teacher, precision,
                                               checkpointing, lora):
    """A real SiD-LSG step of the local backend on the CPU with a teacher of each family (the toy UNet, tiny PixArt
    and SD3; the fake score a LoRA adapter on the teacher's network too): weights, optimizer states, EMA and
    gradients within 1% of the planner's state bytes, and the step's peak (every storage followed) within 3% of
    its estimate."""
    pytest.importorskip("peft") if lora else None
    batch = 4
    folder = teacher_dir if teacher == "toy" else pipeline_dirs[teacher]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\ntwo cats on a sofa\n")
    # The planner counts neither the text encoders' no-grad forward (T5's attention scores, tokens^2 per head) nor
    # the conditioning tensors: a few MB beside a real network's GBs of activations, but most of a tiny network's at
    # T5's 300 tokens; prompts cut to 16 T5 tokens keep them a small share, as at full size.
    data = [] if teacher == "toy" else ["data.source=text", f"data.path={prompts}", "teacher.text_max_length=16"]
    cfg = load_config(None, [*TINY_TOY, *GUIDED, *data, "teacher.kind=diffusers", f"teacher.path={folder}",
                             f"train.run_dir={tmp_path / 'run'}", f"train.batch_size={batch}", "train.device=cpu",
                             f"train.precision={precision}", f"train.activation_checkpointing={checkpointing}",
                             f"fake_score.lora_rank={lora}", f"generator.t_init={999 if teacher == 'sd3' else 625}"])
    trainer = Trainer(cfg)
    trainer.train_step()  # Adam creates its states in its first step
    grads = []
    for trainable in (trainer.generator, trainer.fake_score):
        def step(step=trainable.step, params=trainable.params):
            grads.append(storage_bytes(p.grad for p in params))
            return step()
        trainable.step = step
    nets = (trainer.teacher, trainer.generator.inner, trainer.fake_score.inner, trainer.networks.encoder,
            trainer.networks.vae)
    weights = storage_bytes(t for n in nets for t in (*n.parameters(), *n.buffers()))
    optimizer = storage_bytes(v for tr in (trainer.generator, trainer.fake_score) for s in tr.optimizer.state.values()
                              for v in s.values() if v.numel() > 1)
    ema = storage_bytes(trainer.ema.shadow)
    live = plan.LiveMemory()
    with live:
        trainer.train_step()

    model = plan.load_model(cfg=cfg)
    assert model.family == ("sd" if teacher == "toy" else teacher) and model.latent_size == 8
    networks = tuple(n for n in plan.NETWORKS if n in cfg.train.activation_checkpointing)
    est = plan.estimate(model, cfg, plan.Backend("local", 1, 1), networks, batch, 80.0, device_type="cpu")
    adapter = model.adapter_params(lora, cfg.fake_score.lora_target_modules) if lora else None
    state = plan.state_bytes(plan.Backend("local", 1, 1), model, precision == "bf16", foreach_adam=False,
                             fake_adapter=adapter)
    assert state["teacher"] + state["weights"] + state["encoders"] == pytest.approx(weights, rel=0.01)
    assert state["optimizer"] == optimizer and state["ema"] == ema
    # the fake score's step comes first (trainer.py); a LoRA fake score's gradients are its adapter's
    assert grads == [4 * adapter if lora else state["grads"], state["grads"]]
    measured = weights + optimizer + ema + live.peak
    assert est.allocated == pytest.approx(measured, rel=0.03)
    assert live.peak > 0.15 * measured  # what the step adds to the state is a real part of what is checked


@pytest.mark.parametrize("bf16", [False, True])
def test_vae_decode_measured_on_meta_matches_a_real_decode(teacher_dir, tmp_path, bf16):
    """A sample grid's VAE decode on the CPU (no grad; bf16 under torch's own autocast) against the planner's
    measurement of the teacher folder's VAE config on the meta device: the same ops, so the same storages."""
    from diffusers import AutoencoderKL

    cfg = load_config(None, [*TINY_TOY, "teacher.kind=diffusers", f"teacher.path={teacher_dir}",
                             f"train.run_dir={tmp_path}"])
    model = plan.load_model(cfg=cfg)
    vae = AutoencoderKL.from_pretrained(teacher_dir / "vae")
    assert model.vae_config["block_out_channels"] == list(vae.config.block_out_channels)
    z = torch.randn(plan.DECODE_CHUNK, vae.config.latent_channels, model.latent_size, model.latent_size)
    live = plan.LiveMemory()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16), live:
        vae.decode(z)
    planned = plan.decode_bytes(json.dumps(model.vae_config, sort_keys=True), model.latent_size, plan.DECODE_CHUNK,
                                bf16, "cpu")
    assert planned == pytest.approx(live.peak, rel=0.02)
    # the decode's peak is a real part of a grid's memory: more than the decoded images themselves
    assert live.peak > plan.DECODE_CHUNK * 3 * (8 * model.latent_size) ** 2 * 4


def test_model_flops_match_a_counted_training_step(teacher_dir, tmp_path):
    cfg = load_config(None, [*TINY_TOY, *GUIDED, "teacher.kind=diffusers", f"teacher.path={teacher_dir}",
                             f"train.run_dir={tmp_path}", "train.batch_size=2", "train.device=cpu"])
    trainer = Trainer(cfg)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:  # the unfused attention the planner counts
        trainer.train_step()
    # what the count holds beyond the UNets: the tiny text encoder, once per phase
    assert plan.iteration_flops(plan.load_model(cfg=cfg), cfg, 2) == pytest.approx(counter.get_total_flops(),
                                                                                   rel=0.02)


def test_sharded_state_shrinks_with_the_gpus_and_the_batch_that_fits_grows():
    model, cfg = plan.load_model("sd15"), load_config(None, ["train.precision=bf16"])
    one = plan.state_bytes(plan.Backend("fsdp2", 1, 1), model, bf16=True)
    for gpus in (2, 4, 8):
        sharded = plan.state_bytes(plan.Backend("fsdp2", gpus, gpus), model, bf16=True)
        for key in ("teacher", "weights", "optimizer", "ema", "grads"):
            assert sharded[key] == pytest.approx(one[key] / gpus)
        assert sharded["encoders"] == one["encoders"]  # the text encoder and VAE are not sharded
    local = plan.state_bytes(plan.Backend("local", 1, 1), model, bf16=True)
    # bf16 teacher 2P, fp32 generator and fake score 8P, their Adam states 16P, the EMA 4P
    assert sum(local[k] for k in ("teacher", "weights", "optimizer", "ema")) == 30 * model.params
    batches = [plan.estimate(model, cfg, plan.Backend("fsdp2", n, n), plan.NETWORKS, 8, 80.0).max_batch
               for n in (2, 8)]
    assert 0 < batches[0] < batches[1]
    hybrid = [r for r in plan.plan(model, cfg, gpus=16, shard_size=8) if r.backend == "fsdp2 hybrid 8"]
    assert len(hybrid) == 2 and hybrid[0].bytes["optimizer"] == pytest.approx(16 * model.params / 8)


def test_sdxl_per_gpu_batch_4_on_8_gpus_of_80_gib():
    """What the planner says for SDXL SiD-LSG at 1024 px, 8 x 80 GiB (the issue's target): with fsdp2 and all three
    networks checkpointed, batch 4 per GPU fits; unsharded, the state alone does not fit one GPU."""
    model, cfg = plan.load_model("sdxl"), load_config(None, ["train.precision=bf16", *GUIDED])
    sharded = plan.estimate(model, cfg, plan.Backend("fsdp2", 8, 8), plan.NETWORKS, 4, 80.0)
    assert sharded.fits and sharded.max_batch >= 4
    assert sharded.bytes["activations"] < sharded.allocated / 2
    local = plan.estimate(model, cfg, plan.Backend("local", 1, 1), plan.NETWORKS, 1, 80.0)
    assert not local.fits and local.max_batch == 0
    assert 36 * model.params > 80 * plan.GiB  # teacher, two trained networks, Adam, grads, EMA: 36 bytes each


def test_checkpointing_trades_memory_for_nothing_else_the_planner_sees():
    model, cfg = plan.load_model("sd15"), load_config(None, ["train.precision=bf16", *GUIDED])
    rows = {r.checkpointing: r for r in plan.plan(model, cfg, gpus=8, gpu_mem_gib=80, batch=8) if r.backend == "fsdp2"}
    assert rows["all"].bytes["activations"] < rows["none"].bytes["activations"] / 3
    assert rows["all"].max_batch > rows["none"].max_batch


def test_cli_prints_the_plan_and_refuses_bad_input(capsys, tmp_path):
    assert main(["plan", "-", "train.precision=bf16", "--unet", "tiny", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "fsdp2" in out and "ddp" in out and "max batch" in out
    assert not any(line.startswith("local") for line in out.splitlines())  # one process: not for 2 GPUs
    assert main(["plan", "-", "--network", "tiny_pixart", "--gpus", "2"]) == 0
    assert "PixArtTransformer2DModel" in capsys.readouterr().out
    assert main(["plan", "-", "--unet", "sd3"]) == 2
    assert "--network 'sd3'" in capsys.readouterr().err
    bare = tmp_path / "config.json"
    bare.write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    assert main(["plan", "-", "--network", str(bare)]) == 2
    assert "FluxTransformer2DModel" in capsys.readouterr().err
    assert main(["plan", "-", "--unet", "tiny", "--gpus", "0"]) == 2
    assert "--gpus 0" in capsys.readouterr().err
    assert main(["plan", "-"]) == 2  # the default teacher is the analytic toy: no network to plan
    assert "--network" in capsys.readouterr().err
    with pytest.raises(plan.PlanError, match="multiple of 8"):
        plan.load_model("tiny", resolution=100)
    with pytest.raises(plan.PlanError, match="does not divide"):
        plan.backends_for(8, shard_size=3)
