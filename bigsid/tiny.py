"""Tiny random pipelines of every supported family, built from configs (no downloads).

They have the real architectures and components (tokenizers, text encoders, denoiser, VAE, scheduler) at toy
widths, so loading, conditioning, training, sharding and export run end to end on a CPU. Tokenizers cover every
byte, so any prompt tokenizes: CLIP's byte-level BPE without merges, and for T5 a unigram model over the bytes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

# The SD 1.x/2.x family's tiny pipeline is the toy teacher's (bigsid.toy.build_toy_pipeline). Both PixArt pipelines
# are the pixart family's: `pixart` builds PixArtSigmaPipeline, `pixart_alpha` PixArtAlphaPipeline.
PIPELINES = ("sdxl", "pixart", "pixart_alpha", "sd3")


def byte_level_clip_tokenizer(folder: Path, max_length: int = 32):
    """A CLIPTokenizer whose vocabulary is the 256 byte symbols (plus their end-of-word forms), no merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def byte_level_t5_tokenizer(max_length: int = 64):
    """A T5TokenizerFast over single characters (a unigram model whose pieces are the printable bytes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(chr(b), -1.0) for b in range(32, 127)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def _clip_encoder(tokenizer, hidden: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            projection_dim=hidden, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model,
                                   num_layers=2, num_heads=4, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))


def _vae(channels: int, size: int, **extra):
    from diffusers import AutoencoderKL

    # four blocks: 8 pixels a latent, as in every released model, so the stock pipelines' default image size is
    # the one bigsid conditions on (SDXL's size ids)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=channels, block_out_channels=(8, 8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=8, sample_size=size * 8, **extra)


def build_pipeline(family: str, latent_shape=(4, 8, 8), seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny randomly initialised pipeline of `family` (one of PIPELINES) with latents of `latent_shape`;
    `prediction_type` for the VP families (SD3 predicts the flow velocity).

    PixArt's transformers take resolution and aspect-ratio conditioning as the released ones do: PixArt-alpha's at
    128 latents (its 1024 px model, diffusers' default for that size, the only size at which PixArtAlphaPipeline
    passes them), never PixArt-Sigma's (its pipeline never passes them). Latents of 128 are patched by 8, not 2, so
    that the transformer still sees 16 x 16 tokens."""
    if family == "sd3" and prediction_type != "epsilon":
        raise ValueError(f"prediction_type={prediction_type!r}: an SD3 pipeline predicts the flow velocity")
    import diffusers

    torch.manual_seed(seed)
    channels, size, _ = latent_shape
    with tempfile.TemporaryDirectory() as tmp:
        clip_l, clip_g = (byte_level_clip_tokenizer(Path(tmp) / name) for name in ("l", "g"))
    if family == "sdxl":
        unet = diffusers.UNet2DConditionModel(
            sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=32 + 6 * 8, cross_attention_dim=64, norm_num_groups=8)
        scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                     beta_schedule="scaled_linear", timestep_spacing="leading",
                                                     steps_offset=1, prediction_type=prediction_type)
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae(channels, size), text_encoder=_clip_encoder(clip_l, 32, False), tokenizer=clip_l,
            text_encoder_2=_clip_encoder(clip_g, 32, True), tokenizer_2=clip_g, unet=unet, scheduler=scheduler)
    t5 = byte_level_t5_tokenizer()
    if family in ("pixart", "pixart_alpha"):
        heads = 6 if family == "pixart_alpha" else 4  # 96 wide: the resolution and aspect embeddings are a third each
        transformer = diffusers.PixArtTransformer2DModel(
            sample_size=size, num_layers=2, patch_size=max(2, size // 16), attention_head_dim=16,
            num_attention_heads=heads, caption_channels=32, in_channels=channels, cross_attention_dim=16 * heads,
            out_channels=2 * channels,
            attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            use_additional_conditions=size == 128 if family == "pixart_alpha" else False)
        scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                                          prediction_type=prediction_type)
        pipeline = diffusers.PixArtAlphaPipeline if family == "pixart_alpha" else diffusers.PixArtSigmaPipeline
        return pipeline(tokenizer=t5, text_encoder=_t5_encoder(t5, 32), vae=_vae(channels, size),
                        transformer=transformer, scheduler=scheduler)
    if family == "sd3":
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=size, patch_size=2, in_channels=channels, out_channels=channels, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
            pooled_projection_dim=32, pos_embed_max_size=size)
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(channels, size, scaling_factor=1.5305, shift_factor=0.0609),  # SD3's
            text_encoder=_clip_encoder(clip_l, 16, True),
            tokenizer=clip_l, text_encoder_2=_clip_encoder(clip_g, 16, True), tokenizer_2=clip_g,
            text_encoder_3=_t5_encoder(t5, 64), tokenizer_3=t5)
    raise ValueError(f"family {family!r}: expected one of {PIPELINES} (sd: bigsid.toy.build_toy_pipeline)")
