"""Loading a diffusers teacher on 2 gloo ranks with FSDP2: the generator and the fake score are built empty, sharded,
then filled from the teacher's fp32 weights, read by rank 0 alone; no rank holds a whole trained network."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

WORLD = 2


def status_kib(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def set_up(rank: int, port: int, overrides: list[str], out: str) -> None:
    """One rank: build the networks and prepare them as a run does; write what the test checks."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    import torch.distributed as dist
    # the modules a set-up imports, imported before the measurement starts: what is measured is the tensors
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from peft import LoraConfig  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    from bigsid.config import load_config
    from bigsid.models import build_networks
    from bigsid.parallel import build_backend

    cfg = load_config(None, overrides)
    backend = build_backend(cfg)
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # the kernel's high-water mark VmHWM := VmRSS
    start = status_kib("VmRSS")
    torch.manual_seed(cfg.train.seed)
    networks = build_networks(cfg)
    reads = []
    if networks.initial_state is not None:
        read = networks.initial_state
        networks.initial_state = lambda: reads.append(rank) or read()
    backend.prepare(networks)
    growth = (status_kib("VmHWM") - start) * 1024
    whole = {}
    for name, net in (("generator", networks.generator), ("fake_score", networks.fake_score)):
        for key, value in net.state_dict().items():
            whole[f"{name}.{key}"] = value.full_tensor()  # every rank joins each gather
    teacher_dtypes = sorted({str(p.dtype) for p in networks.teacher.parameters()})
    save_file(whole, f"{out}.rank{rank}.safetensors")
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"growth": growth, "reads": reads,
                                                          "teacher_dtypes": teacher_dtypes}))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A Stable Diffusion teacher whose UNet is large enough (~40 M parameters, 160 MB in fp32) for its copies to
    stand out of a process's other memory, loaded on 2 ranks under bf16 with a LoRA generator."""
    pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel

    from bigsid.config import GMMConfig
    from bigsid.toy import GMM, build_toy_pipeline

    folder = tmp_path_factory.mktemp("loading") / "teacher"
    pipe = build_toy_pipeline(GMM.from_config(GMMConfig(num_prompts=2, modes_per_prompt=2, latent_shape=[4, 8, 8])))
    torch.manual_seed(0)
    pipe.register_modules(unet=UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(192, 384),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8))
    pipe.save_pretrained(folder, safe_serialization=True)
    out = str(folder.parent / "report")
    overrides = ["teacher.kind=diffusers", f"teacher.path={folder}", "parallel.backend=fsdp2", "train.device=cpu",
                 "train.precision=bf16", "train.batch_size=2", "generator.lora_rank=4"]
    mp.start_processes(set_up, args=(free_port(), overrides, out), nprocs=WORLD, start_method="spawn")
    reports = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(WORLD)]
    return folder, reports, [load_file(f"{out}.rank{r}.safetensors") for r in range(WORLD)]


def test_trained_networks_start_as_the_teachers_fp32_weights(loaded):
    from bigsid.families import FAMILIES, UNetDenoiser, load_network

    folder, reports, whole = loaded
    assert all(r["teacher_dtypes"] == ["torch.bfloat16"] for r in reports), "the teacher is stored in bf16"
    assert whole[0].keys() == whole[1].keys()
    for key in whole[0]:
        assert torch.equal(whole[0][key], whole[1][key]), key
    teacher = UNetDenoiser(load_network(FAMILIES["sd"], str(folder)), "epsilon").state_dict()
    base = {}
    for key, value in whole[0].items():
        if "lora_" not in key:
            name = key.removeprefix("generator.net.").removeprefix("fake_score.").replace(".base_layer.", ".")
            base[key] = name
            assert value.dtype == torch.float32 and torch.equal(value, teacher[name]), key
    assert len(base) == 2 * len(teacher), "every teacher weight, once in each trained network"
    lora_a = [v for k, v in whole[0].items() if "lora_A" in k]
    lora_b = [v for k, v in whole[0].items() if "lora_B" in k]
    assert lora_a and all(k.startswith("generator.") for k in whole[0] if "lora_" in k)
    # peft's initialisation: the adapter starts as the identity (B = 0) from a random A
    assert all(a.abs().sum() > 0 for a in lora_a) and all(not b.any() for b in lora_b)


def test_no_rank_holds_a_whole_trained_network(loaded):
    """Peak host memory growth at set-up, from the tensors' arithmetic, W = one fp32 UNet: every rank loads the
    teacher, each tensor read in fp32 and kept in bf16 (W to 1.5 W while it loads: safetensors reads the file
    whole), then holds half of each trained network (W) beside the bf16 teacher (W / 2); rank 0 alone also reads
    the fp32 weights the trained networks start from (W). Building the trained networks as copies of an fp32
    teacher holds 3 W on every rank. The bound, 2.25 W on rank 1, leaves 0.75 W (120 MB) above 1.5 W for what the
    arithmetic leaves out (the allocator's free lists, the largest tensor in flight during the broadcast, the small
    text encoder and VAE), and as much below the copying set-up's 3 W; only rank 0 ever reads the weights."""
    folder, reports, _ = loaded
    unet_bytes = 4 * sum(v.numel() for v in load_file(folder / "unet/diffusion_pytorch_model.safetensors").values())
    assert reports[1]["growth"] < 2.25 * unet_bytes, (reports[1]["growth"] / unet_bytes, "x one fp32 UNet")
    assert [r["reads"] for r in reports] == [[0], []]
