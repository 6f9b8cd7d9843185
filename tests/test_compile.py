"""train.compile and train.channels_last: the blocks they change, the numbers they keep, the torch they refuse."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn
from torch._dynamo.utils import counters

from bigsid import plan
from bigsid.compile import compile_block, to_channels_last
from bigsid.families import UNetDenoiser
from bigsid.config import ConfigError, load_config
from bigsid.text import Cond
from bigsid.trainer import Trainer
from conftest import TINY_TOY


def loss_and_grads(net: nn.Module, dtype: torch.dtype):
    """A fake-score-style loss sum ||net(x_t) - eps||^2 at fixed inputs: (output, loss, parameter gradients)."""
    gen = torch.Generator().manual_seed(1)
    x, eps, emb = (torch.randn(shape, generator=gen).to(dtype) for shape in ((2, 4, 16, 16), (2, 4, 16, 16),
                                                                             (2, 32, 32)))
    net.zero_grad()
    out = net(x, torch.tensor([100, 700]), Cond(emb))
    loss = (out - eps).square().sum()
    loss.backward()
    return out.detach().double(), loss.detach().double(), torch.cat([p.grad.flatten() for p in net.parameters()]).double()


def tiny_unet() -> UNetDenoiser:
    torch.manual_seed(0)
    return UNetDenoiser(UNet2DConditionModel.from_config(plan.load_model("tiny").network_config), "epsilon")


def rounding_bound(eager, exact):
    """|compiled - eager| where both are fp32 evaluations of one function: each is the exact value plus its rounding
    error, so the difference is at most the sum of the two errors. The eager error is measured against float64 (whose
    own error is ~1e-9 of it); inductor's kernels reorder reductions (group norm's mean and variance, the loss's sum)
    and fuse element-wise ops, which changes which roundings happen but not their size per operation: its error is
    allowed twice the eager one, so the difference is at most 3x the eager error."""
    return 3 * (eager - exact).norm()


def test_a_compiled_block_keeps_the_loss_and_gradients_to_fp32_rounding():
    """One block compiled (the whole tiny UNet takes minutes to compile on the CPU; each block compiles alike):
    the UNet's output, a loss on it and every parameter gradient agree with eager fp32 to rounding."""
    eager = tiny_unet()
    exact = copy.deepcopy(eager).double()
    compiled = copy.deepcopy(eager)
    block = compiled.blocks()[0]
    compile_block(block)
    counters.clear()
    out_c, loss_c, grads_c = loss_and_grads(compiled, torch.float32)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did compile the block, not run it eagerly
    out_e, loss_e, grads_e = loss_and_grads(eager, torch.float32)
    out_x, loss_x, grads_x = loss_and_grads(exact, torch.float64)
    d_out = (out_c - out_e).norm()
    assert d_out <= rounding_bound(out_e, out_x)
    assert (grads_c - grads_e).norm() <= rounding_bound(grads_e, grads_x)
    # The loss moves by its first-order change 2 (out - eps) . d_out <= 2 sqrt(loss) |d_out| (Cauchy-Schwarz), plus
    # d_out^2, plus each side's fp32 sum of n squares, off by at most n u loss (u = 2^-24).
    n, u = out_e.numel(), 2.0 ** -24
    assert (loss_c - loss_e).abs() <= 2 * loss_e.sqrt() * d_out + d_out ** 2 + 2 * n * u * loss_e
    # the bounds are tight enough to notice a wrong kernel: a 1e-4 relative change of the output breaks the first
    assert 1e-4 * out_e.norm() > rounding_bound(out_e, out_x)


@pytest.fixture
def trainer_overrides(teacher_dir, tmp_path):
    return [*TINY_TOY, "teacher.kind=diffusers", f"teacher.path={teacher_dir}", f"train.run_dir={tmp_path}",
            "train.batch_size=2", "train.device=cpu"]


def test_train_compile_compiles_exactly_the_repeated_blocks_of_the_three_networks(trainer_overrides):
    trainer = Trainer(load_config(None, [*trainer_overrides, "train.compile=true"]))
    nets = (trainer.teacher, trainer.generator.inner.net, trainer.fake_score.inner)
    blocks = {id(b) for net in nets for b in net.blocks()}
    assert len(blocks) == 3 * 12  # the tiny UNet: 8 resnets and 4 attention blocks
    compiled = {id(m) for net in nets for m in net.modules() if m._compiled_call_impl is not None}
    assert compiled == blocks


def test_channels_last_reaches_the_activations_and_keeps_the_output(trainer_overrides):
    """The trainer's latents come in contiguous (NCHW); with train.channels_last the UNet's weights and its
    activations are NHWC, and its output is the contiguous network's to fp32 rounding (other convolution kernels)."""
    trainer = Trainer(load_config(None, [*trainer_overrides, "train.channels_last=true"]))
    unet = trainer.fake_score.inner.unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    contiguous = copy.deepcopy(unet).to(memory_format=torch.contiguous_format)
    contiguous.conv_in._forward_pre_hooks.clear()  # the hook that makes the input channels_last
    exact = copy.deepcopy(contiguous).double()
    seen = []
    unet.down_blocks[0].resnets[0].register_forward_hook(lambda m, args, out: seen.append(out))
    gen = torch.Generator().manual_seed(1)
    x, emb = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 32, 32, generator=gen)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        out = UNetDenoiser(unet, "epsilon")(x, t, Cond(emb)).double()
        reference = UNetDenoiser(contiguous, "epsilon")(x, t, Cond(emb)).double()
        expected = UNetDenoiser(exact, "epsilon")(x.double(), t, Cond(emb.double()))
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert (out - reference).norm() <= rounding_bound(reference, expected)


def test_compile_is_refused_before_anything_loads_where_inductor_cannot_build(monkeypatch, tmp_path):
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("no-such-compiler-anywhere",))
    with pytest.raises(ConfigError, match=r"C\+\+ compiler.*train.compile=false"):
        load_config(None, ["train.compile=true", "train.device=cpu", f"train.run_dir={tmp_path}"])
    load_config(None, ["train.compile=false", "train.device=cpu", f"train.run_dir={tmp_path}"])


def test_compile_on_cuda_is_refused_without_triton_or_a_c_compiler(monkeypatch):
    """The CUDA checks, on any machine: Triton missing; then Triton present but no C compiler for its launchers."""
    import torch.utils._triton

    from bigsid.compile import compile_unavailable

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert "needs Triton" in compile_unavailable("cuda")
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", "")
    assert "C compiler" in compile_unavailable("cuda") and "train.compile=false" in compile_unavailable("cuda")
    monkeypatch.setenv("CC", "/bin/sh")  # any executable stands for a compiler here
    assert compile_unavailable("cuda") is None



def sharded_worker(rank: int, world: int, port: int, run_dir: str, report: str, channels_last: bool) -> None:
    """The tiny UNet sharded as the fsdp2 backend shards it (a world of one) after train.channels_last's conversion,
    or with a block compiled after sharding, as train.compile does it."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from bigsid.parallel.fsdp2 import FSDP2Backend, units

    torch.set_num_threads(1)
    backend = FSDP2Backend(load_config(None, ["parallel.backend=fsdp2", "train.device=cpu",
                                              f"train.run_dir={run_dir}"]))
    net = tiny_unet()
    if channels_last:
        to_channels_last(net, weights=False)  # FSDP2 refuses non-contiguous parameters
    backend.shard(net, net)
    before = [m for m in net.modules() if isinstance(m, FSDPModule)]
    if not channels_last:
        compile_block(net.blocks()[0])
    seen = []
    net.unet.down_blocks[0].resnets[0].register_forward_hook(lambda m, args, out: seen.append(out))
    counters.clear()
    out, loss, _ = loss_and_grads(net, torch.float32)
    grads = torch.cat([p.grad.full_tensor().flatten() for p in net.parameters()]).double()
    torch.save({"out": out, "loss": loss, "grads": grads, "graphs": counters["stats"]["unique_graphs"],
                "nhwc": seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous(),
                "units_kept": [m for m in net.modules() if isinstance(m, FSDPModule)] == before
                and len(before) == len(units(net)) + 1}, report)
    dist.destroy_process_group()


@pytest.mark.parametrize("channels_last", [False, True])
def test_fsdp2_units_keep_the_loss_and_gradients_with_a_compiled_block_or_channels_last(tmp_path, channels_last):
    """Compiled after fully_shard, as train.compile does it: the unit's gathers run eagerly around the compiled
    forward. channels_last under FSDP2: contiguous weights, NHWC activations. Either way the units are the ones
    sharded, and output and gradients are eager fp32's to rounding."""
    from dist_worker import free_port, start_ranks

    report = str(tmp_path / "r.pt")
    start_ranks(sharded_worker, (1, free_port(), str(tmp_path / "run"), report, channels_last), 1)
    got = torch.load(report, weights_only=True)
    assert got["units_kept"] and (got["nhwc"] if channels_last else got["graphs"] >= 1)
    out_e, _, grads_e = loss_and_grads(tiny_unet(), torch.float32)
    out_x, _, grads_x = loss_and_grads(tiny_unet().double(), torch.float64)
    assert (got["out"] - out_e).norm() <= rounding_bound(out_e, out_x)
    assert (got["grads"] - grads_e).norm() <= rounding_bound(grads_e, grads_x)
