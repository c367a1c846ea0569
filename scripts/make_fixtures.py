"""Build the tiny, randomly initialised diffusers pipelines that tests, the demo and the benchmarks serve offline.

No diffusion weights are reachable from this machine, so the pipelines are built from configs (seeded: the same
bytes on every machine) and saved with `save_pretrained`, so the server loads them exactly like a downloaded
model. Their folder names say `tiny-random`, which is also the name the server reports, so nobody mistakes them
for a real model. Also builds a "larger random SD3-shaped transformer" pipeline for the benchmark (on demand),
and the tiny random LLMs of each served family (`scripts/llm_families.py`).

Adapters for them (random LoRA weights, seeded) go to .cache/adapters/diffusion, in every format the server reads,
with the same weights saved twice where a test compares formats:
    tiny-sd3-a/           PEFT folder (transformer attention + MLP)
    tiny-sd3-a-diffusers/ the same weights as diffusers' pytorch_lora_weights.safetensors
    tiny-sd3-b/           diffusers file with transformer and both text encoders
    tiny-sd15-a/          PEFT folder (UNet attention)
    tiny-sd15-a-kohya/    the same weights as a kohya/A1111 file (lora_unet_* keys, .alpha)
    tiny-sdxl-a/          PEFT folder (UNet attention + MLP), and tiny-sdxl-a-diffusers/ the same as a diffusers file
    tiny-sdxl-b-diffusers/ diffusers file with UNet and both text encoders, tiny-sdxl-b-kohya/ the same as kohya
                          (lora_unet_*, lora_te1_*, lora_te2_*)
    tiny-sdxl-locon/      PEFT folder with LoCon: LoRA on UNet convolutions (lora_A [r, in, kh, kw]) and attention
    tiny-sdxl-locon-kohya/ the same weights as a kohya LoCon file (lora_down/lora_up, .alpha)
    tiny-flux-a/          PEFT folder (transformer), and tiny-flux-a-diffusers/ the same as a diffusers file
    tiny-flux-b/          diffusers file with transformer and the CLIP text encoder (T5 is not LoRA-served)

    python -m scripts.make_fixtures            # tiny pipelines + adapters into .cache/models, .cache/adapters
    python -m scripts.make_fixtures --bench    # also bench-random-sd3 (about 165M parameters), bench-random-sdxl
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from backends.settings import adapters_dir, cache_dir
from scripts.llm_families import FAMILIES, make_family

log = logging.getLogger("make_fixtures")

RECIPE_VERSION = 1
STAMP = "fixture_recipe.json"
CLIP_MAX_LENGTH = 77


@dataclass(frozen=True)
class SD3Shape:
    layers: int = 2
    heads: int = 2
    head_dim: int = 16
    clip_hidden: int = 16
    clip_layers: int = 2
    vae_channels: tuple[int, ...] = (8, 8, 8, 8)  # four blocks: the usual 8x VAE downscale


@dataclass(frozen=True)
class SDXLShape:
    channels: tuple[int, ...] = (16, 32)
    down_blocks: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    heads: tuple[int, ...] = (2, 4)
    layers_per_block: int = 1
    clip_hidden: int = 16


TINY_SD3 = "tiny-random-sd3"
TINY_SD15 = "tiny-random-sd15"
TINY_SDXL = "tiny-random-sdxl"
TINY_FLUX = "tiny-random-flux"
BENCH_SD3 = "bench-random-sd3"
BENCH_SDXL = "bench-random-sdxl"
TINY_PIPELINES = (TINY_SD3, TINY_SD15, TINY_SDXL, TINY_FLUX)
SHAPES = {TINY_SD3: SD3Shape(), BENCH_SD3: SD3Shape(layers=8, heads=12, head_dim=64, clip_hidden=64, clip_layers=2)}
# The benchmark's SDXL: SDXL's three-level layout and two ResNets per level at a quarter of its channels. With one
# transformer layer per attention block (SDXL has up to 10), convolutions take a larger share of a step than in
# SDXL, so LoCon's measured overhead errs high.
SDXL_SHAPES = {TINY_SDXL: SDXLShape(), BENCH_SDXL: SDXLShape(
    channels=(80, 160, 320), down_blocks=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    heads=(2, 4, 8), layers_per_block=2, clip_hidden=64)}


def fixtures_dir() -> Path:
    return cache_dir() / "models"


def _clip_tokenizer(folder: Path):
    """A byte-level CLIP tokenizer with no merges (one token per character): real CLIP vocabularies are not
    reachable offline, and a tiny random text encoder needs no more."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=CLIP_MAX_LENGTH)


def _clip_config(tokenizer, hidden: int, layers: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae(channels: tuple[int, ...], latent_channels: int = 4, **latent_config):
    """`latent_config`: the family's latent normalisation and quant convs (SD3 and Flux pipelines require a shift
    factor; SD1.5/SDXL VAEs have none). sample_size is the default image size in pixels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=channels,
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), norm_num_groups=4, sample_size=64, **latent_config,
    )


def build_sd3(name: str, tmp: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    shape = SHAPES[name]
    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(tmp / "tok")
    clip = _clip_config(tokenizer, shape.clip_hidden, shape.clip_layers)
    text_encoder = CLIPTextModelWithProjection(clip)
    text_encoder_2 = CLIPTextModelWithProjection(clip)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=shape.layers,
        attention_head_dim=shape.head_dim, num_attention_heads=shape.heads,
        joint_attention_dim=2 * shape.clip_hidden, caption_projection_dim=shape.heads * shape.head_dim,
        pooled_projection_dim=2 * shape.clip_hidden, pos_embed_max_size=64,
    )
    # text_encoder_3 (T5) is optional in SD3: without it the pipeline feeds zeros for the T5 part.
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shape.vae_channels, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def build_sd15(name: str, tmp: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(tmp / "tok")
    text_encoder = CLIPTextModel(_clip_config(tokenizer, 16, 2))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=_vae((8, 8, 8, 8)), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sdxl(name: str, tmp: Path):
    """SDXL's shape in miniature: two CLIP encoders (the second with a projection: pooled embeddings), a UNet whose
    cross-attention takes both encoders' hidden states and whose "text_time" embedding takes the pooled one plus
    six size/crop ids; ResNet, down- and upsampler convolutions for LoCon."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    shape = SDXL_SHAPES[name]
    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(tmp / "tok")
    clip = _clip_config(tokenizer, shape.clip_hidden, 2)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=shape.channels,
        layers_per_block=shape.layers_per_block, down_block_types=shape.down_blocks,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(shape.down_blocks)),
        attention_head_dim=shape.heads, use_linear_projection=True, transformer_layers_per_block=1,
        cross_attention_dim=2 * shape.clip_hidden, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + shape.clip_hidden,
        norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=_vae((8, 8, 8, 8), scaling_factor=0.13025), text_encoder=CLIPTextModel(clip),
        text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )


def _t5_tokenizer():
    """A unigram T5 tokenizer over single characters (no SentencePiece model is reachable offline)."""
    import string

    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_letters + string.digits]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_flux(name: str, tmp: Path):
    """Flux's shape in miniature: CLIP (pooled) + T5 (sequence) text encoders, a transformer with double- and
    single-stream blocks and embedded guidance (Flux-dev style), a 16-channel VAE whose latents are packed 2x2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(tmp / "tok")
    tokenizer_2 = _t5_tokenizer()
    t5 = T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=_vae((8, 8, 8, 8), latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModel(_clip_config(tokenizer, 16, 2)), tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5), tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6)),
    )


BUILDERS = {TINY_SD3: build_sd3, TINY_SD15: build_sd15, BENCH_SD3: build_sd3, TINY_SDXL: build_sdxl,
            BENCH_SDXL: build_sdxl, TINY_FLUX: build_flux}


def make_pipeline(name: str, force: bool = False) -> Path:
    """Build (once) and return the folder of pipeline `name`; a stamp records the recipe version."""
    target = fixtures_dir() / name
    stamp = target / STAMP
    if not force and stamp.is_file() and json.loads(stamp.read_text()).get("version") == RECIPE_VERSION:
        log.info("%s: up to date at %s", name, target)
        return target
    with tempfile.TemporaryDirectory() as tmp:
        pipe = BUILDERS[name](name, Path(tmp))
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        pipe.save_pretrained(staging, safe_serialization=True)
        # save_pretrained drops None components; record them so from_pretrained passes None instead of failing.
        index_file = staging / "model_index.json"
        index = json.loads(index_file.read_text())
        index.update({k: [None, None] for k, v in pipe.components.items() if v is None})
        index_file.write_text(json.dumps(index, indent=2))
    (staging / STAMP).write_text(json.dumps({"version": RECIPE_VERSION, "name": name}))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    params = sum(p.numel() for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters())
    log.info("%s: built at %s (%.1fM parameters, random weights)", name, target, params / 1e6)
    return target


@dataclass(frozen=True)
class AdapterFixture:
    name: str
    pipeline: str
    r: int
    alpha: float
    targets: tuple[str, ...]
    text_encoder_targets: tuple[str, ...] = ()
    formats: tuple[str, ...] = ("peft",)  # peft | diffusers | kohya
    seed: int = 0
    std: float = 0.3


ADAPTERS = (
    AdapterFixture("tiny-sd3-a", TINY_SD3, r=4, alpha=8, targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.2"),
                   formats=("peft", "diffusers"), seed=1),
    AdapterFixture("tiny-sd3-b", TINY_SD3, r=8, alpha=8, targets=("to_q", "to_v", "add_k_proj", "ff_context.net.2"),
                   text_encoder_targets=("q_proj", "v_proj", "fc1"), formats=("diffusers",), seed=2),
    AdapterFixture("tiny-sd15-a", TINY_SD15, r=4, alpha=8, targets=("to_q", "to_k", "to_v", "to_out.0"),
                   formats=("peft", "kohya"), seed=3),
    AdapterFixture("tiny-sdxl-a", TINY_SDXL, r=4, alpha=8, targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.2"),
                   formats=("peft", "diffusers"), seed=4),
    AdapterFixture("tiny-sdxl-b", TINY_SDXL, r=8, alpha=4, targets=("to_q", "to_v", "proj_in", "time_emb_proj"),
                   text_encoder_targets=("q_proj", "v_proj", "fc1"), formats=("diffusers", "kohya"), seed=5),
    # LoCon: the 3x3 ResNet convolutions, the 1x1 shortcut and the down/upsampler convolutions, plus attention.
    AdapterFixture("tiny-sdxl-locon", TINY_SDXL, r=4, alpha=2,
                   targets=("conv1", "conv2", "conv_shortcut", "conv", "to_k", "to_out.0"), formats=("peft", "kohya"),
                   seed=6),
    AdapterFixture("tiny-flux-a", TINY_FLUX, r=4, alpha=8,
                   targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "ff.net.2"),
                   formats=("peft", "diffusers"), seed=7),
    AdapterFixture("tiny-flux-b", TINY_FLUX, r=8, alpha=8,
                   targets=("to_q", "to_v", "add_k_proj", "to_add_out", "ff_context.net.2", "proj_out"),
                   text_encoder_targets=("q_proj", "v_proj", "fc1"), formats=("diffusers",), seed=8),
)


def diffusion_adapters_dir() -> Path:
    return adapters_dir() / "diffusion"


def _random_lora(module: torch.nn.Module, r: int, alpha: float, targets: tuple[str, ...], seed: int, std: float):
    """PEFT LoRA layers on `module` with random A and B (PEFT initialises B to zero: no visible effect)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets))
    inject_adapter_in_model(config, module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return config, get_peft_model_state_dict(module)


def make_adapter(fixture: AdapterFixture, force: bool = False) -> list[Path]:
    """Write one fixture adapter in each of its formats; returns the written folders."""
    from safetensors.torch import save_file

    from backends.diffusion.lora import lora_components
    from backends.diffusion.pipeline import load_pipeline

    out = diffusion_adapters_dir()
    folders = {f: out / (fixture.name if f == "peft" or len(fixture.formats) == 1 else f"{fixture.name}-{f}")
               for f in fixture.formats}
    stamp = {"version": RECIPE_VERSION, **{k: v for k, v in fixture.__dict__.items()}}
    if not force and all((d / STAMP).is_file() and json.loads((d / STAMP).read_text()) == json.loads(
            json.dumps(stamp)) for d in folders.values()):
        log.info("%s: up to date", fixture.name)
        return list(folders.values())
    loaded = load_pipeline(str(fixtures_dir() / fixture.pipeline))
    pipe = loaded.pipe
    denoiser = getattr(pipe, loaded.denoiser)
    config, state = _random_lora(denoiser, fixture.r, fixture.alpha, fixture.targets, fixture.seed, fixture.std)
    te_states = {}
    encoders = lora_components(loaded)[1:] if fixture.text_encoder_targets else ()
    for i, te in enumerate(encoders):
        te_config, te_states[te] = _random_lora(getattr(pipe, te), fixture.r, fixture.alpha,
                                                fixture.text_encoder_targets, fixture.seed + 100 + i, fixture.std)
    meta = {k: v for k, v in config.to_dict().items() if k in ("r", "lora_alpha", "target_modules")}
    for fmt, folder in folders.items():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if fmt == "peft":
            save_file(state, folder / "adapter_model.safetensors")
            cfg = {**config.to_dict(), "base_model_name_or_path": loaded.name}
            (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=list))
        elif fmt == "diffusers":
            kwargs = {f"{loaded.denoiser}_lora_layers": state, f"{loaded.denoiser}_lora_adapter_metadata": meta}
            for te, te_state in te_states.items():
                kwargs[f"{te}_lora_layers"] = te_state
                kwargs[f"{te}_lora_adapter_metadata"] = {**meta, "target_modules": list(fixture.text_encoder_targets)}
            type(pipe).save_lora_weights(folder, **kwargs)
        elif fmt == "kohya":
            from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

            # convert_state_dict_to_kohya names text_encoder(_2) lora_te1/lora_te2 and the UNet lora_unet.
            components = {loaded.denoiser: state, **te_states}
            kohya = convert_state_dict_to_kohya({f"{c}.{k}": v for c, sd in components.items() for k, v in sd.items()})
            # diffusers writes alpha = rank; the weights were trained with lora_alpha, so record that.
            kohya = {k: (torch.tensor(float(fixture.alpha)) if k.endswith(".alpha") else v) for k, v in kohya.items()}
            save_file(kohya, folder / f"{fixture.name}.safetensors")
        (folder / STAMP).write_text(json.dumps(stamp))
    log.info("%s: written as %s", fixture.name, ", ".join(str(f) for f in folders.values()))
    return list(folders.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="store_true", help="also build the larger benchmark pipeline")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [*TINY_PIPELINES] + ([BENCH_SD3, BENCH_SDXL] if args.bench else [])
    for name in names:
        make_pipeline(name, force=args.force)
    for fixture in ADAPTERS:
        make_adapter(fixture, force=args.force)
    for family in FAMILIES:  # tiny random LLMs of each served family (tests/test_llm_families.py)
        make_family(family, force=args.force)


if __name__ == "__main__":
    main()
