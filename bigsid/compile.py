"""train.compile and train.channels_last: how the UNets run, not what they compute.

Compilation is regional: each repeated block of each network (a UNet's resnets and attention blocks; the toy MLP's
layers) is compiled on its own with `module.compile()`, after the backend has sharded or wrapped it. The blocks of
one kind share their compiled code wherever their shapes agree, so compile time grows with the number of distinct
blocks, not with depth; the sharding units are the modules they were (FSDP2's and ZeRO-3's gather hooks run eagerly
around a compiled block, as both mark them), and activation checkpointing recomputes a block through its compiled
forward. Dynamo compiles a hooked module's forward as its own frame and skips frames in torch itself, so under FSDP2
the toy MLP's layers (torch.nn.Linear) run eagerly; the UNets' blocks are diffusers code and compile.
"""

from __future__ import annotations

import os
import shutil
import sysconfig

import torch
from torch import nn

# Blocks are compiled for static shapes (automatic dynamic shapes make inductor fail on their symbolic spatial sizes),
# so dynamo keeps a cache entry per block, shape and calling context (grad or not, batch or guided batch, frozen or
# trained weights), all on the one code object the blocks share (Module._call_impl): for three SD1.5 UNets that is
# hundreds, past dynamo's default limits (8 per block, 256 in all), beyond which it silently runs blocks eagerly.
RECOMPILE_LIMIT = 64  # per block
ACCUMULATED_RECOMPILE_LIMIT = 4096  # over all blocks of the three networks


def compile_unavailable(device_type: str) -> str | None:
    """Why torch.compile cannot run here for `device_type` (with what to change), or None when it can. Checked before
    anything loads: inductor fails only at the first forward otherwise, after the networks are built."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return (f"torch {torch.__version__} cannot compile on Python {sysconfig.get_python_version()} here: install "
                "a torch build whose torch.compile supports this Python, or set train.compile=false")
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return ("train.compile on CUDA needs Triton, which this torch install lacks: pip install triton (the "
                    "version your torch wheel requires), or set train.compile=false")
        # Triton builds a small C launcher for each kernel with $CC, else gcc or clang
        if not any(shutil.which(c) for c in (os.environ.get("CC", ""), "gcc", "clang") if c):
            return ("train.compile on CUDA needs a C compiler for Triton's kernel launchers and none is on PATH: "
                    "install one (apt-get install gcc, or set CC), or set train.compile=false")
        return None
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        return ("train.compile on the CPU needs a C++ compiler for inductor's kernels and none is on PATH: install "
                "one (apt-get install g++, or set CXX), or set train.compile=false")
    return None


def compile_block(block: nn.Module) -> None:
    """Compile one block in place (its first call with each shape compiles; later ones reuse the code)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, ACCUMULATED_RECOMPILE_LIMIT)
    block.compile(dynamic=False)


def compile_blocks(*nets: nn.Module) -> None:
    """Compile every repeated block of the given denoisers in place (each names its own: bigsid.families; the toy
    MLP's layers; the exact toy teacher has none)."""
    for net in nets:
        for block in net.blocks() if hasattr(net, "blocks") else []:
            compile_block(block)


def to_channels_last(*nets: nn.Module, weights: bool) -> None:
    """The UNets' input, and with `weights` their 4-D weights, in channels_last (NHWC): tensor cores' convolution
    layout, which spares the transposes cuDNN otherwise makes around each convolution. A convolution's output is
    channels_last when its input is, so every activation after the first convolution is. Weights are converted only
    for backends that keep whole ones (local, ddp): FSDP2 refuses non-contiguous parameters, and the sharded backends
    gather their units as contiguous tensors anyway, so there the convolutions transpose the weights (the small
    operand) and the activations stay NHWC. The toy MLP has no convolutions."""
    for net in nets:
        unet = getattr(net, "unet", None)
        if unet is None:
            continue
        if weights:
            unet.to(memory_format=torch.channels_last)
        unet.conv_in.register_forward_pre_hook(
            lambda module, args: (args[0].contiguous(memory_format=torch.channels_last), *args[1:]))
