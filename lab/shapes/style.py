"""The `shapes` style reader: a copy of the bundled CLIP's text tower taught the world's style captions.

The `shapes` CLIP never saw a style caption ("striped shapes on a gray background"), so nothing scored VGD's style
hypotheses by what pictures share: on pairs sharing a fill, the paper's style decode named the fill in 47.5 % of
held-out pairs (lab/results/style.md). Training the whole CLIP again would change every tool's outputs, so this
trains a copy of the text tower only, against the frozen image tower (the image embeddings stay exactly as they
are), on the world's training scenes captioned half with style captions and half with ordinary captions. A style
caption is true of every picture in the batch that has its fill, colour and background, so the contrastive targets
are spread over all of those (a general caption such as "striped shapes" is pulled towards every striped picture,
"outlined pink shapes on a white background" towards only those).

Only the text tower's layers, final layer norm, position embeddings and text projection are trained; the token
embeddings stay the CLIP's (49,408 rows, most of the CLIP's weights), so the file shipped beside the CLIP holds
those tensors only (`pictoprompt.models.clip.with_text_tower` reads it; `VgdConfig.style_text_encoder`).

    python -m lab.shapes.style             # train; write pictoprompt/models/shapes/weights/style_text.safetensors
    python -m lab.shapes.style --steps 300 --out /tmp/style_text.safetensors
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lab.shapes.train import clip_pixels
from lab.shapes.world import caption_scene, random_free_view, random_scene, render_free_view
from pictoprompt.models.clip import STYLE_TEXT_TENSORS, TransformersClip
from pictoprompt.models.shapes import CLIP_DIR, WEIGHTS_DIR
from pictoprompt.models.shapes.scenes import COLOURS, FILLS, Scene, render_array

STYLE_TEXT_FILE = "style_text.safetensors"


@dataclass(frozen=True)
class StyleConfig:
    seed: int = 0
    pictures: int = 8000
    """Training scenes drawn once; their image embeddings are computed once (the image tower is frozen)."""
    free_views: float = 0.3
    """The share of them drawn off the grid (`FreeView`), as pictures from outside the world are."""
    steps: int = 1500
    batch: int = 256
    lr: float = 5e-4
    style_share: float = 0.5
    """The share of a batch's captions that are style captions; the rest are the world's ordinary captions."""
    prefix_share: float = 0.0
    """The share of style captions cut after one of their words (`random_style_caption`). Tried at 0.3 (1,200
    steps): on the tuning pairs the decode then wrote places after "shapes" ("striped shapes on the left"), fill named
    25 % against 33 % (lab/results/style2.md), so the shipped reader has none."""


@dataclass(frozen=True)
class StyleCaption:
    text: str
    fill: str | None
    colour: str | None
    background: str | None


def random_style_caption(scene: Scene, rng: random.Random, prefix_share: float = 0.0) -> StyleCaption:
    """A style caption of `scene` in the grammar of `world.style_caption` ("[fill] [colour] shapes [on a COLOUR
    background]"): each property it names is shared by all its objects, and it names at least one.

    A `prefix_share` of them is cut after one of its words ("striped", "striped red shapes on a gray"), naming only
    what comes before the cut: VGD scores every growing text, so the reader must read a fill before "shapes".
    """
    fills = {obj.fill for obj in scene.objects}
    colours = {obj.colour for obj in scene.objects}
    while True:
        fill = next(iter(fills)) if len(fills) == 1 and rng.random() < 0.6 else None
        colour = next(iter(colours)) if len(colours) == 1 and rng.random() < 0.4 else None
        background = scene.background if rng.random() < 0.6 else None
        if (fill, colour, background) != (None, None, None):
            break
    words = [word for word in (fill, colour) if word is not None] + ["shapes"]
    if background is not None:
        words += ["on", "an" if background[0] in "aeiou" else "a", background, "background"]
    if prefix_share and rng.random() < prefix_share:
        # The background's colour word is the second last; an object colour always differs from the background.
        background_word = len(words) - 2
        first_named = 0 if fill is not None or colour is not None else background_word
        words = words[: rng.randint(first_named + 1, len(words))]
        fill = fill if fill in words else None
        colour = colour if colour in words[:2] else None
        background = background if len(words) > background_word else None
    return StyleCaption(" ".join(words), fill, colour, background)


def training_pictures(config: StyleConfig) -> tuple[list[Scene], list[bool], np.ndarray]:
    """The training scenes, whether each is a free view, and their pictures (N, 32, 32, 3) uint8."""
    rng = random.Random(f"{config.seed}-style-reader")
    scenes = [random_scene(rng) for _ in range(config.pictures)]
    free = [rng.random() < config.free_views for _ in scenes]
    pictures = [
        render_free_view(scene, random_free_view(scene, rng)) if is_free else render_array(scene)
        for scene, is_free in zip(scenes, free, strict=True)
    ]
    return scenes, free, np.stack(pictures)


def image_embeddings(clip: TransformersClip, pictures: np.ndarray, batch: int = 1024) -> torch.Tensor:
    """Unit image embeddings (N, P) of the frozen image tower, as `encode_image` computes them for 32 px pictures."""
    rows = []
    with torch.no_grad():
        for begin in range(0, len(pictures), batch):
            pixels = torch.from_numpy(pictures[begin : begin + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            pooled = clip.model.vision_model(pixel_values=clip_pixels(pixels)).pooler_output
            rows.append(F.normalize(clip.model.visual_projection(pooled), dim=-1))
    return torch.cat(rows)


class SceneStyles:
    """Each training scene's shared fill and colour (-1 where its objects differ) and its background, as indices, so
    a batch's truth matrix is a few tensor comparisons."""

    def __init__(self, scenes: list[Scene]) -> None:
        def shared(values: set[str], names: tuple[str, ...]) -> int:
            return names.index(next(iter(values))) if len(values) == 1 else -1

        self.fill = torch.tensor([shared({o.fill for o in s.objects}, FILLS) for s in scenes])
        self.colour = torch.tensor([shared({o.colour for o in s.objects}, COLOURS) for s in scenes])
        self.background = torch.tensor([COLOURS.index(s.background) for s in scenes])

    def holds(self, caption: StyleCaption, indices: torch.Tensor) -> torch.Tensor:
        """Which of the scenes at `indices` `caption` holds for (`StyleCaption.holds_for`, vectorised)."""
        held = torch.ones(len(indices), dtype=torch.bool)
        for value, names, column in (
            (caption.fill, FILLS, self.fill),
            (caption.colour, COLOURS, self.colour),
            (caption.background, COLOURS, self.background),
        ):
            if value is not None:
                held &= column[indices] == names.index(value)
        return held


def batch_captions(
    scenes: list[Scene],
    styles: SceneStyles,
    free: list[bool],
    indices: list[int],
    rng: random.Random,
    config: StyleConfig,
) -> tuple[list[str], torch.Tensor]:
    """A caption per picture of the batch and which pictures each caption holds for (B, B): a style caption (a
    `style_share` of them) holds for every picture with its properties, an ordinary caption for its own picture (and any
    with the same text)."""
    columns = torch.tensor(indices)
    texts, rows = [], []
    for row, index in enumerate(indices):
        scene = scenes[index]
        if rng.random() < config.style_share:
            caption = random_style_caption(scene, rng, config.prefix_share)
            texts.append(caption.text)
            rows.append(styles.holds(caption, columns))
        else:
            texts.append(caption_scene(scene, rng, detail=rng.uniform(0.2, 1.0), layout=not free[index]))
            rows.append(torch.nn.functional.one_hot(torch.tensor(row), len(indices)).bool())
    truth = torch.stack(rows)
    same_text: dict[str, list[int]] = {}
    for row, text in enumerate(texts):
        same_text.setdefault(text, []).append(row)
    for group in same_text.values():
        if len(group) > 1:
            truth[torch.tensor(group)[:, None], torch.tensor(group)[None, :]] = True
    return texts, truth.float()


def spread_loss(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Contrastive cross-entropy both ways with the targets spread evenly over every true pair."""
    text_to_image = -(truth / truth.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    image_to_text = -(truth.T / truth.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (text_to_image + image_to_text) / 2


def trained_parameters(clip: TransformersClip) -> dict[str, torch.nn.Parameter]:
    """The text tower's parameters this stage trains (and ships): every one but the token embeddings."""
    return {name: parameter for name, parameter in clip.model.named_parameters() if name.startswith(STYLE_TEXT_TENSORS)}


def train_style_reader(config: StyleConfig, log_every: int = 250) -> tuple[TransformersClip, dict[str, float]]:
    """The CLIP with its text tower trained on style and ordinary captions (float32), and the run's figures."""
    torch.manual_seed(config.seed)
    clip = TransformersClip.from_pretrained(CLIP_DIR, torch.device("cpu"), torch.float32)
    began = time.process_time()
    scenes, free, pictures = training_pictures(config)
    images = image_embeddings(clip, pictures)
    styles = SceneStyles(scenes)
    known: dict[str, list[int]] = {}

    def token_ids(texts: list[str]) -> torch.Tensor:
        # The tokenizer is slow and captions repeat: each text is tokenized once.
        for text in set(texts) - known.keys():
            known[text] = clip.tokenizer(text).input_ids
        rows = [known[text] for text in texts]
        ids = torch.full((len(rows), max(map(len, rows))), clip.tokenizer.eos_token_id)
        for row, text_ids in enumerate(rows):
            ids[row, : len(text_ids)] = torch.tensor(text_ids)
        return ids

    prepared = time.process_time() - began
    parameters = trained_parameters(clip)
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    clip.model.text_model.train()
    optimizer = torch.optim.AdamW(parameters.values(), lr=config.lr, weight_decay=0.01)
    rng = random.Random(f"{config.seed}-style-captions")
    scale = clip.logit_scale
    running = None
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        indices = rng.sample(range(len(scenes)), config.batch)
        texts, truth = batch_captions(scenes, styles, free, indices, rng, config)
        ids = token_ids(texts)
        pooled = clip.model.text_model(input_ids=ids).pooler_output
        text = F.normalize(clip.model.text_projection(pooled), dim=-1)
        loss = spread_loss(scale * text @ images[indices].T, truth)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % log_every == 0:
            print(f"[style reader] step {step + 1} loss {running:.4f}", flush=True)
    clip.model.eval().requires_grad_(False)
    figures = {"steps": config.steps, "prepare_cpu_s": prepared, "cpu_s": time.process_time() - began}
    return clip, figures


def save_text_tower(clip: TransformersClip, path: Path) -> int:
    """Write the trained tensors in float16 (the CLIP's own dtype); returns the file's size in bytes."""
    tensors = {name: value.detach().to(torch.float16).contiguous() for name, value in trained_parameters(clip).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR / STYLE_TEXT_FILE)
    parser.add_argument("--steps", type=int, default=StyleConfig.steps)
    parser.add_argument("--pictures", type=int, default=StyleConfig.pictures)
    parser.add_argument("--seed", type=int, default=StyleConfig.seed)
    parser.add_argument("--prefix-share", type=float, default=StyleConfig.prefix_share)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = StyleConfig(seed=args.seed, pictures=args.pictures, steps=args.steps, prefix_share=args.prefix_share)
    clip, figures = train_style_reader(config)
    size = save_text_tower(clip, args.out)
    print(f"[style reader] {figures}; wrote {args.out} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
