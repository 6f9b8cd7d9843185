"""Loading a diffusers teacher on 2 gloo ranks with FSDP2 and with ZeRO-3: the teacher, the generator and the fake
score are built empty and filled from the teacher's weights (fsdp2 shards each network first and each rank reads
its own rows of the file; ZeRO-3 partitions it module by module as it is filled from rank 0's read); no rank holds a
whole network."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_worker import free_port, start_ranks
from test_parallel import BACKENDS, needs_deepspeed

WORLD = 2
SHARDING = ["fsdp2", pytest.param("zero3", marks=needs_deepspeed)]


def status_kib(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def load_whole(backend: str) -> None:
    """Set-up as it was before, per backend. fsdp2: every rank loads the teacher whole (from_pretrained), then it is
    sharded; with it a LoRA fake score's base network, the teacher's own; rank 0 reads the fp32 weights the trained
    networks start from whole and broadcasts them. ZeRO-3: every rank reads the weights and fills each network whole,
    then its engine partitions it."""
    from bigsid import models
    from bigsid.parallel.base import Backend

    if backend == "fsdp2":
        from bigsid.parallel.fsdp2 import FSDP2Backend

        load = models.load_teacher
        models.load_teacher = lambda *args, **kwargs: load(*args, **{**kwargs, "weights": True})
        FSDP2Backend.reads_stored = False
    else:
        from bigsid.parallel.deepspeed import DeepSpeedBackend

        DeepSpeedBackend.fill, DeepSpeedBackend.reads_weights, DeepSpeedBackend.reads_stored = Backend.fill, True, False


def gathered(net) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded network, on every rank (every rank joins each gather)."""
    if any(hasattr(p, "ds_tensor") for p in net.parameters()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(net.parameters())):
            return {key: value.clone() for key, value in net.state_dict().items()}
    return {key: value.full_tensor() for key, value in net.state_dict().items()}


def record_reads(reads: list, rows: list, rank: int) -> None:
    """Appends `rank` to `reads` each time this process reads the network's weight file whole (families.load_network:
    the teacher loaded whole, the fp32 weights the empty networks start from), and to `rows` the elements of each
    tensor it reads from the file by rows (families.StoredTensor)."""
    import inspect

    from bigsid import families, models

    load, read = families.load_network, families.StoredTensor.read

    def recorded(*args, **kwargs):
        if inspect.signature(load).bind(*args, **kwargs).arguments.get("weights", True):
            reads.append(rank)
        return load(*args, **kwargs)

    def recorded_rows(self, *args, **kwargs):
        t = read(self, *args, **kwargs)
        rows.append(t.numel())
        return t

    families.load_network = models.load_network = recorded
    families.StoredTensor.read = recorded_rows


def set_up(rank: int, port: int, overrides: list[str], out: str, whole: str | None) -> None:
    """One rank: build the networks and prepare them as a run does (`whole`: as the backend of that name did before,
    load_whole); write what the tests check: peak growth once the networks are placed, and at the end of prepare."""
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
    from bigsid.parallel.dist import leave_process_group

    if whole:
        load_whole(whole)
    reads, rows = [], []
    record_reads(reads, rows, rank)
    cfg = load_config(None, overrides)
    backend = build_backend(cfg)
    place, placed = backend.place, []
    backend.place = lambda *args, **kwargs: (place(*args, **kwargs), placed.append(status_kib("VmHWM")))
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # the kernel's high-water mark VmHWM := VmRSS
    start = status_kib("VmRSS")
    torch.manual_seed(cfg.train.seed)
    networks = build_networks(cfg)
    backend.prepare(networks)
    growth = {"placed": (placed[0] - start) * 1024, "prepared": (status_kib("VmHWM") - start) * 1024}
    whole = {}
    for name, net in (("teacher", networks.teacher), ("generator", networks.generator),
                      ("fake_score", networks.fake_score)):
        whole |= {f"{name}.{key}": value for key, value in gathered(net).items()}
    teacher_dtypes = sorted({str(p.dtype) for p in networks.teacher.parameters()})
    save_file(whole, f"{out}.rank{rank}.safetensors")
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"growth": growth, "reads": reads, "rows": sum(rows),
                                                          "teacher_dtypes": teacher_dtypes}))
    leave_process_group()


@pytest.fixture(scope="module", params=SHARDING)
def loaded(request, tmp_path_factory):
    """A Stable Diffusion teacher whose UNet is large enough (~40 M parameters, 160 MB in fp32) for its copies to
    stand out of a process's other memory, loaded on 2 ranks under bf16 with a LoRA generator by each sharding
    backend: (folder, each rank's report, each rank's gathered networks, each rank's report of the set-up as it
    was before, backend name)."""
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
    overrides = ["teacher.kind=diffusers", f"teacher.path={folder}", *BACKENDS[request.param], "train.device=cpu",
                 "train.precision=bf16", "train.batch_size=2", "generator.lora_rank=4"]
    name = request.param
    reports = {}
    for whole in (None, name):
        out = str(folder.parent / f"report_{whole}")
        start_ranks(set_up, (free_port(), overrides, out, whole), WORLD)
        reports[whole] = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(WORLD)]
    gathered = [load_file(f"{folder.parent}/report_None.rank{r}.safetensors") for r in range(WORLD)]
    return folder, reports[None], gathered, reports[name], name


def test_trained_networks_start_as_the_teachers_fp32_weights(loaded):
    from bigsid.families import FAMILIES, UNetDenoiser, load_network

    folder, reports, whole, _, _ = loaded
    assert all(r["teacher_dtypes"] == ["torch.bfloat16"] for r in reports), "the teacher is stored in bf16"
    assert whole[0].keys() == whole[1].keys()
    for key in whole[0]:
        assert torch.equal(whole[0][key], whole[1][key]), key
    teacher = UNetDenoiser(load_network(FAMILIES["sd"], str(folder)), "epsilon").state_dict()
    base = {}
    for key, value in whole[0].items():
        if "lora_" not in key and not key.startswith("teacher."):
            name = key.removeprefix("generator.net.").removeprefix("fake_score.").replace(".base_layer.", ".")
            base[key] = name
            assert value.dtype == torch.float32 and torch.equal(value, teacher[name]), key
    assert len(base) == 2 * len(teacher), "every teacher weight, once in each trained network"
    lora_a = [v for k, v in whole[0].items() if "lora_A" in k]
    lora_b = [v for k, v in whole[0].items() if "lora_B" in k]
    assert lora_a and all(k.startswith("generator.") for k in whole[0] if "lora_" in k)
    # peft's initialisation: the adapter starts as the identity (B = 0) from a random A
    assert all(a.abs().sum() > 0 for a in lora_a) and all(not b.any() for b in lora_b)


def test_teacher_is_the_files_weights_in_bf16_on_every_rank(loaded):
    """The teacher, filled shard by shard from rank 0's fp32 read, holds what from_pretrained(torch_dtype=bf16)
    makes of the file: each weight rounded once to bf16, bit for bit, on both ranks."""
    from bigsid.families import FAMILIES, UNetDenoiser, load_network

    folder, _, whole, _, _ = loaded
    reference = UNetDenoiser(load_network(FAMILIES["sd"], str(folder), torch_dtype=torch.bfloat16), "epsilon")
    expected = reference.state_dict()
    for rank in range(WORLD):
        teacher = {k.removeprefix("teacher."): v for k, v in whole[rank].items() if k.startswith("teacher.")}
        assert teacher.keys() == expected.keys()
        for key, value in expected.items():
            assert value.dtype == torch.bfloat16 and teacher[key].dtype == value.dtype, key
            assert torch.equal(teacher[key], value), (rank, key)


def test_no_rank_holds_a_whole_network(loaded):
    """Peak host memory growth once the networks are placed, from the tensors' arithmetic, W = one fp32 UNet: a rank
    holds half of each trained network (W) and half of the bf16 teacher (W / 4), 1.25 W (ZeRO-3: and one module's
    own parameters whole, here at most 0.04 W): each rank reads the file one tensor at a time, fsdp2 its own rows of
    each, ZeRO-3 each tensor whole as it fills the module that holds it; none reads or holds the fp32 weights whole.
    fsdp2's set-up before, loading the teacher whole on every rank and sharding it after the trained networks, held
    the whole bf16 teacher beside them while it was sharded: 1.75 W on rank 1, the bound (rank 0, also reading the
    fp32 weights whole: 2.25 W and more; ZeRO-3's before held all three networks whole on every rank: 2.5 W and
    more), which leaves 0.5 W (80 MB) for what the arithmetic leaves out (the allocator's free lists, the tensor in
    flight, the small text encoder and VAE). Checked once placed: ZeRO-3's engines then allocate Adam's states and
    the gradients' partitions at once, where FSDP2 does so at the first step. The set-up before shows that every
    whole read is seen (fsdp2's read the teacher whole on every rank, then rank 0 the weights the trained networks
    start from; ZeRO-3's read them once on every rank)."""
    folder, reports, _, before, name = loaded
    stored = load_file(folder / "unet/diffusion_pytorch_model.safetensors")
    unet_bytes = 4 * sum(v.numel() for v in stored.values())
    for rank in range(WORLD):
        placed = reports[rank]["growth"]["placed"]
        assert placed < 1.75 * unet_bytes, (rank, placed / unet_bytes, "x one fp32 UNet")
    assert [r["reads"] for r in reports] == [[], []]
    # each of the three networks reads every stored element: fsdp2 once, split between the ranks as their shards
    # are (half each, less a row or more of the tensors whose rows do not split evenly); ZeRO-3 once on each rank
    elements = sum(v.numel() for v in stored.values())
    if name == "fsdp2":
        assert sum(r["rows"] for r in reports) == 3 * elements
        assert all(r["rows"] < 0.55 * 3 * elements for r in reports), [r["rows"] for r in reports]
    else:
        assert [r["rows"] for r in reports] == [3 * elements] * WORLD
    assert [r["reads"] for r in before] == {"fsdp2": [[0, 0], [1]], "zero3": [[0], [1]]}[name]


@needs_deepspeed
def test_zero3_broadcasts_the_buffers_read_from_the_file(tmp_path):
    """SD3's position embedding is a buffer the file holds (PixArt's is computed as built). Saved as .bin, which no
    rank can read tensor by tensor, the weights are read by rank 0 alone: under ZeRO-3 rank 1, which reads nothing,
    gets rank 0's, so that both ranks' bf16 teachers hold what from_pretrained(torch_dtype=bf16) loads, the buffer
    included, bit for bit. With hpZ (zero_hpz_partition_size), whose process group the first
    module's partitioning makes and every later one must be given, since DeepSpeed refuses to make it twice."""
    from bigsid.families import FAMILIES, load_network
    from bigsid.tiny import build_pipeline

    folder = tmp_path / "sd3"
    build_pipeline("sd3").save_pretrained(folder, safe_serialization=False)
    family = FAMILIES["sd3"]
    reference = family.denoiser(load_network(family, str(folder), torch_dtype=torch.bfloat16), "epsilon")
    read = [name for name, b in family.denoiser(load_network(family, str(folder), weights=False), "epsilon")
            .named_buffers() if b.is_meta]
    assert read == ["transformer.pos_embed.pos_embed"]
    hpz = tmp_path / "hpz.json"
    hpz.write_text(json.dumps({"zero_optimization": {"zero_hpz_partition_size": WORLD}}))
    overrides = ["teacher.kind=diffusers", f"teacher.path={folder}", *BACKENDS["zero3"], "train.device=cpu",
                 "train.precision=bf16", "train.batch_size=2", f"parallel.deepspeed_config={hpz}"]
    out = str(tmp_path / "report")
    start_ranks(set_up, (free_port(), overrides, out, None), WORLD)
    for rank in range(WORLD):
        held = {k.removeprefix("teacher."): v for k, v in load_file(f"{out}.rank{rank}.safetensors").items()
                if k.startswith("teacher.")}
        assert held.keys() == reference.state_dict().keys()
        for key, value in reference.state_dict().items():
            assert held[key].dtype == value.dtype and torch.equal(held[key], value), (rank, key)
    reports = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(WORLD)]
    assert [(r["reads"], r["rows"]) for r in reports] == [([0], 0), ([], 0)]


def train(rank: int, port: int, overrides: list[str], whole: str | None) -> None:
    """One rank of a short run; `whole`: set-up as the backend of that name did before (load_whole). peft draws more
    random numbers for an adapter on a loaded network than on an empty one, so the adapters' random A matrices are
    drawn again here, alike in both set-ups."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from bigsid import models
    from bigsid.config import load_config
    from bigsid.parallel.dist import leave_process_group
    from bigsid.trainer import Trainer

    if whole:
        load_whole(whole)
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    networks = models.build_networks(cfg)
    draw = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for net in (networks.generator, networks.fake_score):
            for name, p in net.named_parameters():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=draw) / p.shape[1] ** 0.5)
    Trainer(cfg, networks).run()
    leave_process_group()


# fsdp2 with a LoRA fake score fills the generator and the fake score's base as a full fake score would be filled;
# the bf16 teacher those share with ZeRO-3's case is checked weight for weight by the `loaded` tests
@pytest.mark.parametrize("name, extra", [("fsdp2", ["fake_score.lora_rank=4"]),
                                         pytest.param("zero3", [], marks=needs_deepspeed)],
                         ids=["fsdp2-lora_fake_score", "zero3-bf16_teacher"])
def test_losses_equal_those_of_a_set_up_as_before(teacher_dir, tmp_path, name, extra):
    """The same weights, sharded alike, give the same losses bit for bit, whether the networks were filled shard by
    shard (fsdp2) or module by module as they were partitioned (ZeRO-3), or as before (load_whole): the same values
    in the same shards or partitions, so the same arithmetic on them. ZeRO-3 now numbers the parameters in another
    order, each module after those inside it, which orders the tensors in its gathers and gradient buckets but no
    sum: each gradient element is still the sum of the same two ranks' values. With a LoRA fake score the teacher
    is its base network with the adapter off, which is filled the same way."""
    from conftest import TINY_TOY
    from test_parallel import losses

    if extra:
        pytest.importorskip("peft")
    # the losses are compared, not the end-of-run evaluation: a small one, as bf16 convolutions are slow on CPUs
    args = [*TINY_TOY, "teacher.kind=diffusers", f"teacher.path={teacher_dir}", *BACKENDS[name], "train.device=cpu",
            "train.precision=bf16", "train.batch_size=4", "train.total_nimg=12", "train.log_every=1",
            "train.checkpoint_every=0", "eval.num_samples=16", *extra]
    for whole in (None, name):
        overrides = [*args, f"train.run_dir={tmp_path / str(whole)}"]
        start_ranks(train, (free_port(), overrides, whole), WORLD)
    filled, reference = losses(tmp_path / "None"), losses(tmp_path / name)
    assert filled.shape == (3, 2) and filled.isfinite().all()
    assert torch.equal(filled, reference), (filled, reference)


def fill_by_rows(rank: int, port: int, file: str, out: str) -> None:
    """One rank: a network of uneven rows (3 and 5 over 2 ranks) built on meta, sharded by FSDP2, filled by
    FSDP2Backend.load_state from the file's rows, plus a buffer built on each rank with that rank's own value."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from safetensors import safe_open
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from bigsid.config import load_config
    from bigsid.families import StoredTensor
    from bigsid.parallel.dist import leave_process_group
    from bigsid.parallel.fsdp2 import FSDP2Backend

    backend = FSDP2Backend(load_config(None, ["parallel.backend=fsdp2", "train.device=cpu"]))
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5))
    net.register_buffer("scale", torch.full((3,), float(rank)))
    for layer in net:
        fully_shard(layer, mesh=backend.mesh)
    fully_shard(net, mesh=backend.mesh)
    with safe_open(file, framework="pt") as f:
        state = {key: StoredTensor(Path(file), key, tuple(f.get_slice(key).get_shape())) for key in f.keys()}
    backend.fill(net, {**state, "scale": net.scale.clone()})
    save_file({k: (v.full_tensor() if hasattr(v, "full_tensor") else v).contiguous()
               for k, v in net.state_dict().items()}, f"{out}.rank{rank}.safetensors")
    leave_process_group()


def test_fsdp2_fills_uneven_shards_from_the_files_rows(tmp_path):
    """Each rank reads the rows torch.chunk gives it (2 and 1 of 3, 3 and 2 of 5), so the gathered network is the
    file's, bit for bit, on both ranks; a tensor built on every rank rather than read (an adapter's, a buffer) is
    rank 0's on both, as the whole read's broadcast made it."""
    from torch import nn

    torch.manual_seed(0)
    weights = {k: v.contiguous() for k, v in nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5)).state_dict().items()}
    save_file(weights, tmp_path / "net.safetensors")
    out = str(tmp_path / "filled")
    start_ranks(fill_by_rows, (free_port(), str(tmp_path / "net.safetensors"), out), WORLD)
    for rank in range(WORLD):
        filled = load_file(f"{out}.rank{rank}.safetensors")
        assert filled.keys() == weights.keys() | {"scale"}
        for key, value in weights.items():
            assert torch.equal(filled[key], value), (rank, key)
        assert torch.equal(filled["scale"], torch.zeros(3)), rank
