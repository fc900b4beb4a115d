"""Train the `shapes` model set from seeds: CLIP (contrastive), the VAE, the U-Net (then on SD-IPC's prompt
layout too, then with offset noise), CLIP's image side, the LLM's adapter; export.

    python -m lab.shapes.train --out runs/shapes            # train, then export into the package
    python -m lab.shapes.train --out runs/shapes --device cuda
    python -m lab.shapes.train --out runs/shapes --only llm # one stage alone, exporting its files

Every batch is drawn fresh from the scene generator with a seed derived from (seed, stage, step), so the data
never repeats, nothing held out ever appears, and a resumed run sees exactly the batches it would have seen.
Each stage checkpoints to `OUT/<stage>.pt` every few minutes and at its end; running the same command again
resumes from there (finished stages are skipped).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer

from lab.schedule import build_scheduler
from lab.shapes.language import answer_loss, chat_batch, export_language, load_base_llm
from lab.shapes.lora import LoraAdapter
from lab.shapes.world import FreeView, caption_scene, random_free_view, random_scene, render_free_view, shape_twin
from pictoprompt.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from pictoprompt.models.clip_tokenizer import (
    CLIP_CONTEXT_LENGTH,
    CLIP_VOCAB_SIZE,
    load_clip_tokenizer,
    write_clip_tokenizer,
)
from pictoprompt.models.shapes import WEIGHTS_DIR
from pictoprompt.models.shapes.scenes import IMAGE_SIZE, PALETTE, TRAIN_SHAPES, Scene, render_array
from pictoprompt.progress import Progress

TEXT_WIDTH = 64
LATENT_SIZE = IMAGE_SIZE // 2
STAGES = ("clip", "vae", "unet", "unet_layout", "unet_offset", "clip_vision", "clip_views", "llm")
ALONE_STAGES = ("unet_offset", "unet_background", "clip_views", "llm")
"""Stages that can run alone (`--only`): the LLM's adapter needs no other stage's weights, the free views go on from
the exported CLIP and the offset-noise stage from the exported generator (those of `--export`)."""


@dataclass
class TrainConfig:
    """Each stage runs until it has done its steps or spent its minutes, whichever comes first.

    The learning rate follows a cosine over that same fraction, so a time-bound run on a slow CPU still anneals.
    """

    seed: int = 0
    clip_steps: int = 20000
    clip_minutes: float = 14.0
    clip_batch: int = 64
    clip_lr: float = 2e-3
    clip_twins: float = 0.5
    clip_words_weight: float = 1.0
    vae_steps: int = 20000
    vae_minutes: float = 8.0
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_object_weight: float = 9.0
    unet_steps: int = 100000
    unet_minutes: float = 75.0
    unet_batch: int = 32
    unet_lr: float = 1e-3
    unet_ema: float = 0.998
    layout_steps: int = 100000
    layout_minutes: float = 15.0
    layout_lr: float = 2e-4
    layout_ema: float = 0.995
    layout_share: float = 0.3
    offset_steps: int = 100000
    offset_minutes: float = 35.0
    offset_lr: float = 2e-4
    offset_ema: float = 0.995
    noise_offset: float = 0.3
    background_steps: int = 200
    background_minutes: float = 30.0
    background_batch: int = 16
    background_lr: float = 2e-4
    background_ema: float = 0.98
    background_share: float = 0.5
    vision_steps: int = 20000
    vision_minutes: float = 15.0
    vision_batch: int = 64
    vision_lr: float = 1e-3
    vision_caption_detail: float = 0.8
    vision_twins: float = 0.5
    vision_shape_weight: float = 3.0
    views_steps: int = 20000
    views_minutes: float = 25.0
    views_lr: float = 5e-4
    views_share: float = 0.5
    llm_steps: int = 240
    llm_minutes: float = 30.0
    llm_batch: int = 8
    llm_lr: float = 1e-3
    llm_warmup: int = 20
    llm_rank: int = 8
    llm_alpha: float = 16.0
    caption_dropout: float = 0.1
    caption_detail: float = 0.5
    checkpoint_seconds: float = 180.0


# ------------------------------------------------------------------------------------------------ architectures


def clip_config() -> CLIPConfig:
    return CLIPConfig(
        text_config={
            "vocab_size": CLIP_VOCAB_SIZE,
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 4 * TEXT_WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": CLIP_CONTEXT_LENGTH,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": 4,
        },
        projection_dim=64,
    )


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        # Cross-attention at 8x8 and 4x4 only: at 16x16 it costs more than the rest of the network on a CPU.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=16,
    )


# ---------------------------------------------------------------------------------------------------------- data


@dataclass
class SceneBatch:
    pixels: torch.Tensor
    """Pictures in [-1, 1], shape (size, 3, 32, 32)."""
    captions: list[str]
    backgrounds: torch.Tensor
    """Each picture's background colour in [-1, 1], shape (size, 3, 1, 1)."""
    shapes: torch.Tensor
    """Which training shapes each picture shows, multi-hot, shape (size, len(TRAIN_SHAPES))."""


def training_scenes(seed: int, stage: str, step: int, size: int, twins: float = 0.0) -> list[tuple[Scene, float]]:
    """The scenes of one training batch with the seed of each one's caption, fixed by (seed, stage, step).

    A fraction `twins` of the batch are shape twins of other scenes in it (`shape_twin`), with the same caption
    seed, so a contrastive loss cannot tell them apart by colour, layout or wording.
    """
    rng = random.Random(f"{seed}-{stage}-{step}")
    n_twins = min(size // 2, round(size * twins))
    originals = [random_scene(rng) for _ in range(size - n_twins)]
    scenes = originals + [shape_twin(scene, rng) for scene in originals[:n_twins]]
    caption_seeds = [rng.random() for _ in originals]
    caption_seeds += caption_seeds[:n_twins]
    return list(zip(scenes, caption_seeds, strict=True))


def scene_batch(
    seed: int, stage: str, step: int, size: int, detail: float, twins: float = 0.0, free_views: float = 0.0
) -> SceneBatch:
    """Pictures and their captions of `training_scenes`, the only scenes any stage trains on.

    A fraction `free_views` of the scenes (a twin with its original, in the same placements) is drawn as a
    `FreeView`, off the grid, and captioned without size or position.
    """
    scenes_and_seeds = training_scenes(seed, stage, step, size, twins)
    n_twins = min(size // 2, round(size * twins))
    n_originals = size - n_twins
    view_rng = random.Random(f"{seed}-{stage}-{step}-views")
    views: list[FreeView | None] = [
        random_free_view(scene, view_rng) if view_rng.random() < free_views else None
        for scene, _ in scenes_and_seeds[:n_originals]
    ]
    views += views[:n_twins]
    pictures, captions, backgrounds = [], [], []
    shapes = torch.zeros(size, len(TRAIN_SHAPES))
    for i, ((scene, caption_seed), view) in enumerate(zip(scenes_and_seeds, views, strict=True)):
        pictures.append(render_array(scene) if view is None else render_free_view(scene, view))
        captions.append(caption_scene(scene, random.Random(caption_seed), detail, layout=view is None))
        backgrounds.append(PALETTE[scene.background])
        for obj in scene.objects:
            shapes[i, TRAIN_SHAPES.index(obj.shape)] = 1.0
    return SceneBatch(
        pixels=torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1.0,
        captions=captions,
        backgrounds=torch.tensor(backgrounds, dtype=torch.float32).view(size, 3, 1, 1) / 127.5 - 1.0,
        shapes=shapes,
    )


def background_batch(seed: int, step: int, size: int, detail: float, share: float) -> SceneBatch:
    """A batch of the background stage (`train_unet_background`): `1 - share` of it ordinary training scenes (so
    what the U-Net knew stays), the rest single objects on a background drawn uniformly from the palette, captioned
    with the background always named, half of them the *colour twins* of the other half: the same scene and
    caption choices with the object's and the background's colours swapped ("a white heart on a green background"
    and "a green heart on a white background"), so that only the words' order tells which colour is which."""
    stage = "unet_background"
    targeted = 2 * (round(size * share) // 2)
    ordinary = scene_batch(seed, stage, step, size - targeted, detail)
    rng = random.Random(f"{seed}-{stage}-{step}-twins")
    scenes, caption_seeds = [], []
    for _ in range(targeted // 2):
        obj = random_scene(rng, 1).objects[0]
        # The twin's object takes the background's colour: never a held-out combination.
        allowed = [c for c in PALETTE if c != obj.colour and not replace(obj, colour=c).is_held_out]
        background = rng.choice(allowed)
        scenes.append(Scene(background, (obj,)))
        caption_seeds.append(rng.random())
    scenes += [Scene(s.objects[0].colour, (replace(s.objects[0], colour=s.background),)) for s in scenes]
    caption_seeds += caption_seeds
    pictures, captions = [], []
    for scene, caption_seed in zip(scenes, caption_seeds, strict=True):
        pictures.append(render_array(scene))
        caption = caption_scene(scene, random.Random(caption_seed), detail)
        if not caption.endswith(" background"):
            caption += f" on {'an' if scene.background[0] in 'aeiou' else 'a'} {scene.background} background"
        captions.append(caption)
    pixels = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    backgrounds = torch.tensor([PALETTE[s.background] for s in scenes], dtype=torch.float32) / 127.5 - 1.0
    return SceneBatch(
        pixels=torch.cat([ordinary.pixels, pixels]),
        captions=ordinary.captions + captions,
        backgrounds=torch.cat([ordinary.backgrounds, backgrounds.view(-1, 3, 1, 1)]),
        shapes=torch.cat([ordinary.shapes, torch.zeros(len(scenes), len(TRAIN_SHAPES))]),
    )


def clip_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pictures -> CLIP's normalised input (same as `preprocess_images` on a 32x32 picture)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels + 1) / 2 - mean) / std


def tokenize(tokenizer: CLIPTokenizer, captions: list[str], pad_to_context: bool) -> torch.Tensor:
    """Token ids; the text tower is causal, so padding only to the longest caption leaves EOS states unchanged."""
    padding = "max_length" if pad_to_context else "longest"
    return tokenizer(
        captions, padding=padding, max_length=CLIP_CONTEXT_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


# -------------------------------------------------------------------------------------------------- checkpoints


class Checkpointer:
    """Saves a stage's state atomically every `every` seconds and at the end."""

    def __init__(self, path: Path, every: float) -> None:
        self.path, self.every, self.last = path, every, time.monotonic()

    def load(self) -> dict[str, Any] | None:
        return torch.load(self.path, map_location="cpu", weights_only=False) if self.path.is_file() else None

    def maybe_save(self, state: Callable[[], dict[str, Any]], force: bool = False) -> None:
        if force or time.monotonic() - self.last >= self.every:
            tmp = self.path.with_suffix(".tmp")
            torch.save(state(), tmp)
            tmp.replace(self.path)
            self.last = time.monotonic()


def _lr(fraction: float, step: int, peak: float, warmup: int = 100) -> float:
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction)))


def _log(message: str) -> None:
    print(message, flush=True)


def _run_stage(
    name: str,
    steps: int,
    minutes: float,
    out: Path,
    config: TrainConfig,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    peak_lr: float,
    step_fn: Callable[[int], dict[str, float]],
    progress: Progress,
    after_step: Callable[[], None] | None = None,
    warmup: int = 100,
) -> None:
    """The loop every stage shares: resume, schedule the learning rate, log, checkpoint, stop on budget."""
    checkpointer = Checkpointer(out / f"{name}.pt", config.checkpoint_seconds)
    state = checkpointer.load()
    step, spent = 0, 0.0
    if state is not None:
        for key, module in modules.items():
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        step, spent = state["step"], state["seconds"]
    budget = minutes * 60

    def fraction() -> float:
        # A zero budget (`--layout-minutes 0`) turns the stage off: it saves its starting weights and returns.
        return max(step / steps, spent / budget if budget > 0 else 1.0)

    if state is not None:
        # A finished stage goes on when its budget has been raised (the cosine picks up at the new fraction).
        if fraction() >= 1.0:
            _log(f"[{name}] finished earlier ({step} steps, {spent / 60:.1f} min); skipping")
            return
        _log(f"[{name}] resuming at step {step} ({spent / 60:.1f} min spent)")

    def snapshot(done: bool = False) -> dict[str, Any]:
        return {
            **{key: module.state_dict() for key, module in modules.items()},
            "optimizer": optimizer.state_dict(),
            "step": step,
            "seconds": spent,
            "done": done,
        }

    running: dict[str, float] = {}
    while fraction() < 1.0:
        began = time.monotonic()
        for group in optimizer.param_groups:
            group["lr"] = _lr(fraction(), step, peak_lr, warmup)
        losses = step_fn(step)
        if after_step is not None:
            after_step()
        step += 1
        spent += time.monotonic() - began
        for key, value in losses.items():
            running[key] = 0.95 * running.get(key, value) + 0.05 * value
        if step % 25 == 0:
            shown = " ".join(f"{k}={v:.4f}" for k, v in running.items())
            _log(
                f"[{name}] step {step} {shown} {spent / step:.3f}s/it {spent / 60:.1f}/{minutes:.0f}min "
                f"lr={optimizer.param_groups[0]['lr']:.2e}"
            )
        progress.step(fraction(), 1.0, f"{name} step {step}")
        checkpointer.maybe_save(snapshot)
    checkpointer.maybe_save(lambda: snapshot(done=True), force=True)
    _log(f"[{name}] done: {step} steps in {spent / 60:.1f} min")


# -------------------------------------------------------------------------------------------------------- stages


def caption_words_loss(head: torch.nn.Linear, pooled: torch.Tensor, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Cross-entropy of the caption's bag of words, read from the text tower's pooled state by `head`.

    The target spreads evenly over the caption's tokens (start, end and padding left out), so the pooled state
    must name every word of the caption, not only the ones a contrastive batch needs.
    """
    words = (ids != eos_id) & (ids != ids[:, :1])
    target = torch.zeros(len(ids), head.out_features, device=ids.device)
    target.scatter_add_(1, ids, words.float())
    target = target / target.sum(dim=1, keepdim=True).clamp_min(1.0)
    return F.cross_entropy(head(pooled), target)


def train_clip(out: Path, config: TrainConfig, device: torch.device, progress: Progress) -> CLIPModel:
    """Contrastive CLIP, plus an auxiliary head (not shipped) that names the caption's words from the text tower.

    The text tower becomes the generator's text encoder, so its states must carry every attribute a caption
    names. Without the auxiliary loss, contrastive training on a CPU budget left them carrying colour and little
    else (the pooled states of "... on the left" and "... on the right" differed by 1%), and the U-Net trained on
    them drew the right colour in a random shape at a random place.
    """
    torch.manual_seed(config.seed)
    model = CLIPModel(clip_config()).to(device).train()
    words_head = torch.nn.Linear(TEXT_WIDTH, CLIP_VOCAB_SIZE).to(device)
    tokenizer = load_clip_tokenizer(out / "tokenizer")
    optimizer = torch.optim.AdamW([*model.parameters(), *words_head.parameters()], lr=config.clip_lr, weight_decay=0.1)

    def step_fn(step: int) -> dict[str, float]:
        batch = scene_batch(config.seed, "clip", step, config.clip_batch, config.caption_detail, config.clip_twins)
        pixels, captions = batch.pixels, batch.captions
        ids = tokenize(tokenizer, captions, pad_to_context=False).to(device)
        outputs = model(input_ids=ids, pixel_values=clip_pixels(pixels.to(device)), return_loss=True)
        words = caption_words_loss(words_head, outputs.text_model_output.pooler_output, ids, tokenizer.eos_token_id)
        optimizer.zero_grad(set_to_none=True)
        (outputs.loss + config.clip_words_weight * words).backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
            accuracy = (outputs.logits_per_image.argmax(-1) == torch.arange(len(captions), device=device)).float()
        return {"loss": outputs.loss.item(), "acc": accuracy.mean().item(), "words": words.item()}

    _run_stage(
        "clip",
        config.clip_steps,
        config.clip_minutes,
        out,
        config,
        {"model": model, "words_head": words_head},
        optimizer,
        config.clip_lr,
        step_fn,
        progress,
    )
    return model.eval()


def train_vae(out: Path, config: TrainConfig, device: torch.device, progress: Progress) -> AutoencoderKL:
    torch.manual_seed(config.seed + 1)
    vae = build_vae().to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)

    def step_fn(step: int) -> dict[str, float]:
        batch = scene_batch(config.seed, "vae", step, config.vae_batch, config.caption_detail)
        pixels, background = batch.pixels.to(device), batch.backgrounds.to(device)
        posterior = vae.encode(pixels).latent_dist
        # The mean, not a sample: with a KL weight as small as Stable Diffusion's the posterior is nearly a
        # point, and skipping the sampling noise makes this small autoencoder converge in CPU minutes.
        reconstruction = vae.decode(posterior.mode()).sample
        # Objects cover a tenth of a picture; without more weight the decoder first learns backgrounds with
        # blobs of the average object colour on them.
        on_object = ((pixels - background).abs().amax(dim=1, keepdim=True) > 0.05).float()
        weight = 1 + config.vae_object_weight * on_object
        mse = (weight * (reconstruction - pixels) ** 2).mean()
        l1 = (weight * (reconstruction - pixels).abs()).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + l1 + config.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"mse": mse.item(), "l1": l1.item(), "kl": kl.item()}

    _run_stage(
        "vae",
        config.vae_steps,
        config.vae_minutes,
        out,
        config,
        {"model": vae},
        optimizer,
        config.vae_lr,
        step_fn,
        progress,
    )
    return vae.eval()


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, config: TrainConfig, device: torch.device) -> float:
    """1 / std of the latents, as Stable Diffusion scales its latents to unit variance."""
    latents = []
    for step in range(8):
        pixels = scene_batch(config.seed, "vae-scale", step, 64, config.caption_detail).pixels
        latents.append(vae.encode(pixels.to(device)).latent_dist.mean)
    return float(1.0 / torch.cat(latents).std())


def eos_layout(states: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """SD-IPC's prompt layout (its Eq. 7) filled with each caption's own EOS state instead of `f_cnvrt`.

    `states` (B, L, D) are text-tower states, `eos` (B,) each row's EOS index: the start state stays at position 0
    and the EOS state takes every later position (words and pads alike).
    """
    eos_states = states[torch.arange(states.shape[0], device=states.device), eos]
    return torch.cat([states[:, :1], eos_states[:, None].expand(-1, states.shape[1] - 1, -1)], dim=1)


def _denoising_step_fn(
    stage: str,
    stream: int,
    config: TrainConfig,
    device: torch.device,
    unet: UNet2DConditionModel,
    optimizer: torch.optim.Optimizer,
    text_model: torch.nn.Module,
    vae: AutoencoderKL,
    scaling_factor: float,
    tokenizer: CLIPTokenizer,
    layout_share: float = 0.0,
    noise_offset: float = 0.0,
    background_share: float = 0.0,
) -> Callable[[int], dict[str, float]]:
    """One epsilon-prediction step on a fresh batch: captions dropped to "" for classifier-free guidance, a share
    `layout_share` of the rest given as `eos_layout` instead of their full states, and `noise_offset` times one
    normal draw per picture and channel added to the noise (offset noise, see `train_unet_offset`). With
    `background_share`, the batches are `background_batch`'s."""
    noise_schedule = DDPMScheduler.from_config(build_scheduler().config)
    generator = torch.Generator(device="cpu")

    def step_fn(step: int) -> dict[str, float]:
        if background_share > 0:
            batch = background_batch(
                config.seed, step, config.background_batch, config.caption_detail, background_share
            )
        else:
            batch = scene_batch(config.seed, stage, step, config.unet_batch, config.caption_detail)
        pixels, captions = batch.pixels, batch.captions
        generator.manual_seed(config.seed * 1_000_003 + step + stream * 1_000_000_007)
        drop = torch.rand(len(captions), generator=generator) < config.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        with torch.no_grad():
            ids = tokenize(tokenizer, captions, pad_to_context=True).to(device)
            states = text_model(input_ids=ids).last_hidden_state
            posterior = vae.encode(pixels.to(device)).latent_dist
            latents = posterior.mode() * scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(
            0, noise_schedule.config.num_train_timesteps, (len(captions),), generator=generator
        ).to(device)
        if layout_share > 0:
            # Drawn last, so that a stage without the layout sees exactly the random numbers it always did.
            pick = (torch.rand(len(captions), generator=generator) < layout_share) & ~drop
            eos = (ids == tokenizer.eos_token_id).int().argmax(dim=-1)
            states = torch.where(pick[:, None, None].to(device), eos_layout(states, eos), states)
        if noise_offset > 0:
            # Drawn after everything else, for the same reason.
            offset = torch.randn((*latents.shape[:2], 1, 1), generator=generator).to(device)
            noise = noise + noise_offset * offset
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=states).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        return {"loss": loss.item()}

    return step_fn


def _ema_updater(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> Callable[[], None]:
    @torch.no_grad()
    def update() -> None:
        for target, source in zip(ema.parameters(), model.parameters(), strict=True):
            target.lerp_(source, 1 - decay)

    return update


@dataclass(frozen=True)
class DenoiserStage:
    """One U-Net stage's schedule: its name, its noise stream, its budget and its EMA decay."""

    name: str
    stream: int
    """Which noise stream the stage draws from, so two stages never repeat each other's noise."""
    steps: int
    minutes: float
    lr: float
    ema_decay: float
    layout_share: float = 0.0
    """The share of captions given in SD-IPC's prompt layout (`eos_layout`) instead of their full states."""
    noise_offset: float = 0.0
    """The scale of offset noise: one normal draw per picture and latent channel, added to the noise."""
    background_share: float = 0.0
    """The share of each batch given to `background_batch`'s uniform backgrounds and colour twins."""
    warmup: int = 100
    """Steps of linear warm-up of the learning rate."""


def _train_denoiser(
    stage: DenoiserStage,
    model: UNet2DConditionModel,
    out: Path,
    config: TrainConfig,
    device: torch.device,
    text_model: torch.nn.Module,
    vae: AutoencoderKL,
    scaling_factor: float,
    progress: Progress,
) -> UNet2DConditionModel:
    """Train `model` on epsilon prediction with the text tower's states, keeping an EMA copy, which it returns."""
    ema = build_unet().to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=0.0)
    step_fn = _denoising_step_fn(
        stage.name,
        stage.stream,
        config,
        device,
        model,
        optimizer,
        text_model.eval().requires_grad_(False),
        vae,
        scaling_factor,
        load_clip_tokenizer(out / "tokenizer"),
        layout_share=stage.layout_share,
        noise_offset=stage.noise_offset,
        background_share=stage.background_share,
    )
    after_step = _ema_updater(ema, model, stage.ema_decay)
    models = {"model": model, "ema": ema}
    _run_stage(
        stage.name,
        stage.steps,
        stage.minutes,
        out,
        config,
        models,
        optimizer,
        stage.lr,
        step_fn,
        progress,
        after_step,
        warmup=stage.warmup,
    )
    return ema


def train_unet(
    out: Path,
    config: TrainConfig,
    device: torch.device,
    clip: CLIPModel,
    vae: AutoencoderKL,
    scaling_factor: float,
    progress: Progress,
) -> UNet2DConditionModel:
    """Train the U-Net from scratch on full captions."""
    torch.manual_seed(config.seed + 2)
    unet = build_unet().to(device).train()
    vae.requires_grad_(False)
    stage = DenoiserStage("unet", 0, config.unet_steps, config.unet_minutes, config.unet_lr, config.unet_ema)
    return _train_denoiser(stage, unet, out, config, device, clip.text_model, vae, scaling_factor, progress)


def train_unet_layout(
    out: Path,
    config: TrainConfig,
    device: torch.device,
    clip: CLIPModel,
    vae: AutoencoderKL,
    scaling_factor: float,
    unet: UNet2DConditionModel,
    progress: Progress,
) -> UNet2DConditionModel:
    """Go on training the U-Net (from its EMA weights) with a share of captions in SD-IPC's prompt layout.

    SD-IPC rests on a property of Stable Diffusion (its section 3.1, Fig. 2, footnote 7): the image follows the
    caption's EOS state, so a prompt of the start state and one EOS-like state at every other position draws
    what the caption does. A U-Net trained on full captions only need not have it: the previous stage's U-Net
    drew the right shape from that layout 84% of the time against 90% from the caption (100 held-out scenes x 2
    seeds), so the SD-IPC benchmark measured the stand-in's lack of the premise, not the conversion. This stage
    trains towards the property with the caption's own EOS state (it narrows the distance without closing it;
    MODEL_CARD.md has the figures) and never sees an image or an image embedding.
    """
    model = build_unet().to(device).train()
    model.load_state_dict(unet.state_dict())
    stage = DenoiserStage(
        "unet_layout",
        1,
        config.layout_steps,
        config.layout_minutes,
        config.layout_lr,
        config.layout_ema,
        config.layout_share,
    )
    return _train_denoiser(stage, model, out, config, device, clip.text_model, vae, scaling_factor, progress)


def train_unet_offset(
    out: Path,
    config: TrainConfig,
    device: torch.device,
    text_model: torch.nn.Module,
    vae: AutoencoderKL,
    scaling_factor: float,
    unet: UNet2DConditionModel,
    progress: Progress,
) -> UNet2DConditionModel:
    """Go on training the U-Net (from its EMA weights) with offset noise, so that the prompt sets the background.

    The scaled-linear schedule leaves `sqrt(alpha_bar_T)` = 0.068 of the picture in the noisiest latents, and a
    picture's background is most of its mean. Trained on that leak, the U-Net read the background from the mean of
    the starting noise rather than from the prompt: "a red circle on a white background" came out pink 5 times in
    8, "... on a black background" blue or gray 9 times in 10, while adding the leak a white (black) picture would
    have left to the same starting noise drew white (black) 10 times in 10 (MODEL_CARD.md). Offset noise (a normal
    draw per picture and channel, times `noise_offset`, added to the noise) hides that leak, so the mean must come
    from the text. The SD-IPC layout share of the previous stage continues, to keep its property.
    """
    model = build_unet().to(device).train()
    model.load_state_dict(unet.state_dict())
    stage = DenoiserStage(
        "unet_offset",
        2,
        config.offset_steps,
        config.offset_minutes,
        config.offset_lr,
        config.offset_ema,
        config.layout_share,
        config.noise_offset,
    )
    return _train_denoiser(stage, model, out, config, device, text_model, vae, scaling_factor, progress)


def train_unet_background(
    out: Path,
    config: TrainConfig,
    device: torch.device,
    text_model: torch.nn.Module,
    vae: AutoencoderKL,
    scaling_factor: float,
    unet: UNet2DConditionModel,
    progress: Progress,
) -> UNet2DConditionModel:
    """Go on training the U-Net (from the exported one) so that every named background is drawn, whatever the
    object's colour (`background_batch`).

    After the offset stage the generator followed the named background in 96.7 % of the palette's 90
    object-background pairs (`pictoprompt bench backgrounds`), but not where the object's colour won the picture:
    "a white heart on a green background" 3 in 6 (blue), "a black ... on a green background" 4 in 6 (black with a
    green object), "a blue ... on a gray background" 3 in 6 (blue). Two causes, both in the data: the world draws
    white backgrounds 4 times and green ones once in 17 and names a background in half the captions, and the
    text tower tells a caption from its colour-swapped twin by less than it tells two object colours apart (the
    last pad state of "a blue heart on a gray background" moves 18 % for "a gray heart on a blue background", 67 %
    for "a red heart on a gray background"). The stage gives half of each batch to uniform, always named
    backgrounds and their colour twins, the other half to ordinary scenes, with offset noise and the SD-IPC layout
    share as in the offset stage; the text tower stays frozen (it is the CLIP's).
    """
    model = build_unet().to(device).train()
    model.load_state_dict(unet.state_dict())
    stage = DenoiserStage(
        "unet_background",
        3,
        config.background_steps,
        config.background_minutes,
        config.background_lr,
        config.background_ema,
        config.layout_share,
        config.noise_offset,
        config.background_share,
        warmup=10,
    )
    return _train_denoiser(stage, model, out, config, device, text_model, vae, scaling_factor, progress)


@dataclass(frozen=True)
class ImageSideStage:
    """One stage of training CLIP's image side: its name, its scene stream, its budget and its share of free views."""

    name: str
    stream: str
    steps: int
    minutes: float
    lr: float
    free_views: float


def _train_image_side(
    stage: ImageSideStage, out: Path, config: TrainConfig, device: torch.device, clip: CLIPModel, progress: Progress
) -> CLIPModel:
    """Train CLIP's image tower, its projection and the text projection against the frozen text tower.

    The text tower is the generator's text encoder, so it must stay as the U-Net saw it; the U-Net never reads
    the text projection, so that may move. Every batch holds shape twins, and an auxiliary head (not shipped)
    names the shapes a picture shows from the image tower's pooled state.
    """
    clip.requires_grad_(False)
    shape_head = torch.nn.Linear(clip.config.vision_config.hidden_size, len(TRAIN_SHAPES)).to(device)
    trained = [
        *clip.vision_model.parameters(),
        *clip.visual_projection.parameters(),
        *clip.text_projection.parameters(),
        clip.logit_scale,
    ]
    for parameter in trained:
        parameter.requires_grad_(True)
    clip.vision_model.train()
    tokenizer = load_clip_tokenizer(out / "tokenizer")
    optimizer = torch.optim.AdamW([*trained, *shape_head.parameters()], lr=stage.lr, weight_decay=0.1)

    def step_fn(step: int) -> dict[str, float]:
        batch = scene_batch(
            config.seed,
            stage.stream,
            step,
            config.vision_batch,
            config.vision_caption_detail,
            config.vision_twins,
            stage.free_views,
        )
        with torch.no_grad():
            ids = tokenize(tokenizer, batch.captions, pad_to_context=False).to(device)
            text_states = clip.text_model(input_ids=ids).pooler_output
        texts = F.normalize(clip.text_projection(text_states), dim=-1)
        pooled = clip.vision_model(pixel_values=clip_pixels(batch.pixels.to(device))).pooler_output
        images = F.normalize(clip.visual_projection(pooled), dim=-1)
        logits = clip.logit_scale.exp() * images @ texts.T
        labels = torch.arange(len(batch.captions), device=device)
        contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        shape_logits = shape_head(pooled)
        shape_loss = F.binary_cross_entropy_with_logits(shape_logits, batch.shapes.to(device))
        loss = contrastive + config.vision_shape_weight * shape_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
            shape_accuracy = ((shape_logits > 0).float() == batch.shapes.to(device)).all(dim=1).float().mean()
        return {
            "loss": contrastive.item(),
            "acc": (logits.argmax(-1) == labels).float().mean().item(),
            "shape_loss": shape_loss.item(),
            "shape_acc": shape_accuracy.item(),
        }

    _run_stage(
        stage.name,
        stage.steps,
        stage.minutes,
        out,
        config,
        {"model": clip, "shape_head": shape_head},
        optimizer,
        stage.lr,
        step_fn,
        progress,
    )
    return clip.eval().requires_grad_(False)


def train_clip_vision(
    out: Path, config: TrainConfig, device: torch.device, clip: CLIPModel, progress: Progress
) -> CLIPModel:
    """Go on training CLIP's image side on the world's grid scenes.

    On a CPU budget the first stage learns colour and position but hardly shape (in-batch negatives mostly
    differ by colour, and shape is a few pixels of a 32x32 picture): the twins and the shape head are for that.
    """
    stage = ImageSideStage(
        "clip_vision", "clip-vision", config.vision_steps, config.vision_minutes, config.vision_lr, 0.0
    )
    return _train_image_side(stage, out, config, device, clip, progress)


def train_clip_views(
    out: Path, config: TrainConfig, device: torch.device, clip: CLIPModel, progress: Progress
) -> CLIPModel:
    """Go on training CLIP's image side with a share `views_share` of free views (`FreeView`).

    The world draws two sizes on a 3x3 grid in exact palette colours; pictures from outside come at any size and
    place, in nearby colours, with other line widths. Trained on the grid alone, the image tower named the shape
    of 42% of such pictures drawn with PIL (against 100% of the grid's).
    """
    stage = ImageSideStage(
        "clip_views", "clip-views", config.views_steps, config.views_minutes, config.views_lr, config.views_share
    )
    return _train_image_side(stage, out, config, device, clip, progress)


def train_llm(out: Path, config: TrainConfig, device: torch.device, progress: Progress) -> tuple[LoraAdapter, Any]:
    """A LoRA adapter on SmolLM2-135M-Instruct that answers VGD's chat with the world's captions
    (`language.py`). The base model stays frozen; only the adapter is saved and shipped."""
    llm = load_base_llm()
    llm.model.to(device)
    adapter = LoraAdapter(llm.model, rank=config.llm_rank, alpha=config.llm_alpha).to(device).attach()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.llm_lr, weight_decay=0.0)
    pad_id = llm.tokenizer.pad_token_id or llm.tokenizer.eos_token_id

    def step_fn(step: int) -> dict[str, float]:
        chats = chat_batch(llm, config.seed, step, config.llm_batch)
        loss = answer_loss(llm.model, chats, pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    _run_stage(
        "llm",
        config.llm_steps,
        config.llm_minutes,
        out,
        config,
        {"adapter": adapter},
        optimizer,
        config.llm_lr,
        step_fn,
        progress,
        warmup=config.llm_warmup,
    )
    adapter.detach()
    return adapter.to("cpu"), llm


# -------------------------------------------------------------------------------------------------------- export


def export(
    directory: Path,
    clip: CLIPModel,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    scaling_factor: float,
    tokenizer_dir: Path,
) -> None:
    """Write `clip/` and `generator/` in the transformers/diffusers layouts, in float16."""
    clip = export_clip(directory, clip)
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    vae.register_to_config(scaling_factor=scaling_factor)
    export_generator(directory, text_encoder, vae, unet, load_clip_tokenizer(tokenizer_dir))


def export_generator(
    directory: Path,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    tokenizer: CLIPTokenizer,
) -> None:
    """Write `generator/` in the diffusers layout, in float16."""
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.to("cpu", torch.float16)
    pipeline.save_pretrained(directory / "generator", safe_serialization=True)


def export_clip(directory: Path, clip: CLIPModel) -> CLIPModel:
    """Write `clip/` in the transformers layout, in float16; returns the float16 model."""
    clip_dir = directory / "clip"
    clip = clip.to("cpu", torch.float16)
    clip.save_pretrained(clip_dir, safe_serialization=True)
    write_clip_tokenizer(clip_dir)
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": IMAGE_SIZE},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
    }
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return clip


# ---------------------------------------------------------------------------------------------------------- main


def _stage_summary(out: Path, stages: Sequence[str]) -> dict[str, dict[str, float]]:
    summary = {}
    for stage in stages:
        state = torch.load(out / f"{stage}.pt", map_location="cpu", weights_only=False)
        summary[stage] = {"steps": state["step"], "minutes": round(state["seconds"] / 60, 1)}
    return summary


def _write_training_record(directory: Path, config: TrainConfig, device: str, stages: dict[str, Any]) -> None:
    """training.json: the config and, per stage, its steps and minutes; a stage run alone updates its own entry."""
    path = directory / "training.json"
    record = json.loads(path.read_text()) if path.is_file() else {"stages": {}}
    record["config"] = asdict(config)
    record["device"] = device
    record["stages"] = {**record.get("stages", {}), **stages}
    path.write_text(json.dumps(record, indent=2))


def train(
    out: Path,
    config: TrainConfig,
    device: str = "cpu",
    export_to: Path | None = WEIGHTS_DIR,
    progress: Progress | None = None,
    only: Sequence[str] | None = None,
) -> Path:
    """Run (or resume) the stages under `out`, then export the weights to `export_to`.

    `only` runs some of the `ALONE_STAGES` alone and exports just their files.
    """
    progress = progress or Progress()
    out.mkdir(parents=True, exist_ok=True)
    torch_device = torch.device(device)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    if only:
        _train_alone(out, config, torch_device, export_to, progress, only)
        return out
    write_clip_tokenizer(out / "tokenizer")
    budgets = [
        config.clip_minutes,
        config.vae_minutes,
        config.unet_minutes,
        config.layout_minutes,
        config.offset_minutes,
        config.vision_minutes,
        config.views_minutes,
        config.llm_minutes,
    ]
    starts = [sum(budgets[:i]) for i in range(len(budgets))]

    def part(i: int) -> Progress:
        return progress.scaled(starts[i], budgets[i], sum(budgets))

    clip = train_clip(out, config, torch_device, part(0))
    vae = train_vae(out, config, torch_device, part(1))
    scaling_factor = latent_scaling_factor(vae, config, torch_device)
    _log(f"[vae] latent scaling factor {scaling_factor:.4f}")
    unet = train_unet(out, config, torch_device, clip, vae, scaling_factor, part(2))
    unet = train_unet_layout(out, config, torch_device, clip, vae, scaling_factor, unet, part(3))
    unet = train_unet_offset(out, config, torch_device, clip.text_model, vae, scaling_factor, unet, part(4))
    clip = train_clip_vision(out, config, torch_device, clip, part(5))
    clip = train_clip_views(out, config, torch_device, clip, part(6))
    adapter, llm = train_llm(out, config, torch_device, part(7))
    if export_to is not None:
        stages = _stage_summary(out, STAGES)
        export(export_to, clip, vae, unet, scaling_factor, out / "tokenizer")
        export_language(export_to, adapter, llm)
        _write_training_record(export_to, config, device, stages)
        _log(f"exported to {export_to}: {json.dumps(stages)}")
    return out


def _train_generator_alone(
    out: Path, config: TrainConfig, device: torch.device, export_to: Path | None, progress: Progress, name: str
) -> None:
    """`unet_offset` or `unet_background` alone: on from the exported generator, exported again."""
    generator_dir = (export_to or WEIGHTS_DIR) / "generator"
    if not generator_dir.is_dir():
        raise FileNotFoundError(f"--only {name} goes on from an exported generator, and {generator_dir} holds none")
    write_clip_tokenizer(out / "tokenizer")
    exported = StableDiffusionPipeline.from_pretrained(str(generator_dir), dtype=torch.float32)
    # Fresh modules with the exported weights, so that nothing of where they were read from is written back.
    text_encoder = CLIPTextModel(exported.text_encoder.config)
    text_encoder.load_state_dict(exported.text_encoder.state_dict())
    vae = build_vae()
    vae.load_state_dict(exported.vae.state_dict())
    scaling_factor = exported.vae.config.scaling_factor
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.to(device).requires_grad_(False)
    train_stage = train_unet_offset if name == "unet_offset" else train_unet_background
    unet = train_stage(
        out, config, device, text_encoder.to(device), vae, scaling_factor, exported.unet.to(device), progress
    )
    if export_to is not None:
        export_generator(export_to, text_encoder, vae, unet, load_clip_tokenizer(out / "tokenizer"))
        _write_training_record(export_to, config, str(device), _stage_summary(out, [name]))
        _log(f"exported the generator to {export_to}")


def _train_alone(
    out: Path,
    config: TrainConfig,
    device: torch.device,
    export_to: Path | None,
    progress: Progress,
    only: Sequence[str],
) -> None:
    unknown = sorted(set(only) - set(ALONE_STAGES))
    if unknown:
        raise ValueError(f"only {', '.join(ALONE_STAGES)} can run alone, not {', '.join(unknown)}")
    for name in ("unet_offset", "unet_background"):
        if name in only:
            _train_generator_alone(out, config, device, export_to, progress, name)
    if "clip_views" in only:
        clip_dir = (export_to or WEIGHTS_DIR) / "clip"
        if not clip_dir.is_dir():
            raise FileNotFoundError(f"--only clip_views goes on from an exported CLIP, and {clip_dir} holds none")
        write_clip_tokenizer(out / "tokenizer")
        clip = CLIPModel.from_pretrained(str(clip_dir), dtype=torch.float32).to(device)
        clip = train_clip_views(out, config, device, clip, progress)
        if export_to is not None:
            export_clip(export_to, clip)
            _write_training_record(export_to, config, str(device), _stage_summary(out, ["clip_views"]))
            _log(f"exported the CLIP to {export_to}")
    if "llm" in only:
        adapter, llm = train_llm(out, config, device, progress)
        if export_to is not None:
            export_language(export_to, adapter, llm)
            _write_training_record(export_to, config, str(device), _stage_summary(out, ["llm"]))
            _log(f"exported the LLM adapter and the lexicon to {export_to}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/shapes"), help="checkpoint directory")
    parser.add_argument("--export", type=Path, default=WEIGHTS_DIR, help="where to write the weights")
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument(
        "--only", nargs="+", choices=ALONE_STAGES, help="run these stages alone and export only their files"
    )
    defaults = TrainConfig()
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = TrainConfig(**{field: getattr(args, field) for field in asdict(defaults)})
    train(args.out, config, args.device, None if args.no_export else args.export, only=args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
