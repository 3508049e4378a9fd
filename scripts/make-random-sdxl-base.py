#!/usr/bin/env python3
"""Writes a full-size SDXL base with random weights as one fp16 single-file checkpoint in the
original layout (what sd_xl_base_1.0.safetensors looks like), for measuring halod at real scale
without the real weights: load time, estimated vs actual bytes, job estimates, s/step.

The shapes are SDXL base's public configuration: UNet with 320/640/1280 channels, transformer
depths 1/2/10 (the first level has none), 5/10/20 heads of 64, cross-attention over 2048 context
channels, text_time added conditioning (256 per time id, 2816 inputs); CLIP-L (768 wide, 12
layers); OpenCLIP bigG (1280 wide, 32 layers, 1280 projection); the VAE (128/256/512/512, 2
resnets per level, 4 latent channels). The weights are N(0, 1/fan_in) matrices, unit norm
weights and zero biases: images are noise, the work is real. Not run in CI (about 7 GB).

    . ~/.cache/halo-refstack/bin/activate     # ../shared/tools/refstack.sh
    python scripts/make-random-sdxl-base.py /tmp/sdxl-random.safetensors

Then point a [[models]] entry (kind = "sdxl", no diffusers_config) at the file: halod infers
everything from the shapes and tokenizes with its built-in CLIP vocabulary.
"""

import importlib.util
import math
import os
import sys

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "single",
    os.path.join(HERE, "..", "daemon", "tests", "fixtures", "diffusion", "gen_tiny_sdxl_single_file.py"),
)
single = importlib.util.module_from_spec(spec)
spec.loader.exec_module(single)

UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
)
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768,
)
CLIP_G = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)


def random_state(model, seed):
    """fp16 random weights for every parameter of a model built on the meta device."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        shape = tuple(p.shape)
        if name.endswith("position_ids"):
            continue
        if name.endswith("bias"):
            t = torch.zeros(shape)
        elif len(shape) == 1:
            t = torch.ones(shape)
        else:
            fan_in = math.prod(shape[1:]) if "embedding" not in name else shape[-1]
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[name] = t.to(torch.float16)
    return out


def main():
    out = sys.argv[1]
    ckpt = {}
    with init_empty_weights():
        unet = UNet2DConditionModel(**UNET)
    ckpt.update(single.unet_original(random_state(unet, 1), dict(unet.config)))
    del unet
    with init_empty_weights():
        vae = AutoencoderKL(**VAE)
    ckpt.update(single.vae_original(random_state(vae, 2), dict(vae.config)))
    del vae
    with init_empty_weights():
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    for k, v in random_state(te1, 3).items():
        k = k if k.startswith("text_model.") else "text_model." + k
        ckpt["conditioner.embedders.0.transformer." + k] = v
    del te1
    with init_empty_weights():
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    ckpt.update(single.open_clip_original(random_state(te2, 4)))
    del te2
    ckpt = {k: v.contiguous() for k, v in ckpt.items()}
    n = sum(v.numel() for v in ckpt.values())
    print(f"{len(ckpt)} tensors, {n / 1e9:.2f} B parameters, {2 * n / 2**30:.2f} GiB in fp16")
    save_file(ckpt, out)
    print(f"wrote {out}: {os.path.getsize(out) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
