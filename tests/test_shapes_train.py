"""The U-Net stages' conditioning (SD-IPC's prompt layout with a caption's own EOS state, and the share of it), their
offset noise, and the stages that run alone from exported weights."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPModel

from lab.shapes.train import TrainConfig, _denoising_step_fn, build_vae, clip_config, eos_layout, scene_batch, tokenize
from pictoprompt.models.clip_tokenizer import load_clip_tokenizer, write_clip_tokenizer


def test_eos_layout_keeps_the_start_state_and_puts_the_eos_state_everywhere_after() -> None:
    states = torch.randn(3, 8, 4)
    before = states.clone()
    eos = torch.tensor([2, 5, 7])
    layout = eos_layout(states, eos)
    assert layout.shape == states.shape
    assert torch.equal(layout[:, 0], states[:, 0])
    for row, index in enumerate(eos.tolist()):
        assert torch.equal(layout[row, 1:], states[row, index].expand(7, 4))
    assert torch.equal(states, before)


class RecordingUNet(torch.nn.Module):
    """Stands in for the U-Net: remembers what it was fed and predicts a scaled copy of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.fed: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor):
        self.fed.append((noisy.detach().clone(), encoder_hidden_states.detach().clone()))
        return SimpleNamespace(sample=noisy * self.scale)


def _one_step(
    tmp_path: Path, layout_share: float, noise_offset: float = 0.0
) -> tuple[RecordingUNet, list[str], torch.nn.Module, object]:
    torch.manual_seed(0)
    config = TrainConfig(unet_batch=16, caption_dropout=0.25)
    write_clip_tokenizer(tmp_path)
    tokenizer = load_clip_tokenizer(tmp_path)
    text_model = CLIPModel(clip_config()).text_model.eval()
    unet = RecordingUNet()
    optimizer = torch.optim.SGD(unet.parameters(), lr=0.0)
    step_fn = _denoising_step_fn(
        "unet_layout",
        1,
        config,
        torch.device("cpu"),
        unet,
        optimizer,
        text_model,
        build_vae().eval(),
        1.0,
        tokenizer,
        layout_share=layout_share,
        noise_offset=noise_offset,
    )
    losses = step_fn(3)
    # A step's pictures, captions, noise and timesteps are fixed by (seed, stage, step): a resumed stage repeats it.
    assert step_fn(3) == losses and torch.equal(unet.fed[0][0], unet.fed[1][0])
    captions = scene_batch(config.seed, "unet_layout", 3, config.unet_batch, config.caption_detail).captions
    return unet, captions, text_model, tokenizer


def test_the_layout_share_replaces_captions_states_and_nothing_else(tmp_path: Path) -> None:
    plain, captions, text_model, tokenizer = _one_step(tmp_path, layout_share=0.0)
    every, _, _, _ = _one_step(tmp_path, layout_share=1.0)
    with torch.no_grad():
        ids = tokenize(tokenizer, captions, pad_to_context=True)
        full = text_model(input_ids=ids).last_hidden_state
        layout = eos_layout(full, (ids == tokenizer.eos_token_id).int().argmax(dim=-1))
        empty = text_model(input_ids=tokenize(tokenizer, [""], pad_to_context=True)).last_hidden_state[0]

    (plain_noisy, plain_states), (every_noisy, every_states) = plain.fed[0], every.fed[0]
    # The layout is drawn after the noise, so a stage without it sees exactly the same noisy latents.
    assert torch.equal(plain_noisy, every_noisy)
    kinds = {"caption": 0, "dropped": 0}
    for row in range(len(captions)):
        dropped = torch.allclose(plain_states[row], empty, atol=1e-6)
        if dropped:
            kinds["dropped"] += 1
            assert torch.allclose(every_states[row], empty, atol=1e-6), "a dropped caption must stay empty"
            continue
        assert torch.allclose(plain_states[row], full[row], atol=1e-6)
        assert torch.allclose(every_states[row], layout[row], atol=1e-6)
        assert not torch.allclose(every_states[row], full[row], atol=1e-3)
        kinds["caption"] += 1
    assert kinds["caption"] > 0 and kinds["dropped"] > 0, kinds


def test_offset_noise_shifts_each_latent_channel_by_one_constant_and_changes_nothing_else(tmp_path: Path) -> None:
    plain, _, _, _ = _one_step(tmp_path, layout_share=0.3)
    offset, _, _, _ = _one_step(tmp_path, layout_share=0.3, noise_offset=0.3)
    (plain_noisy, plain_states), (offset_noisy, offset_states) = plain.fed[0], offset.fed[0]
    assert torch.equal(plain_states, offset_states)
    shift = offset_noisy - plain_noisy
    # One draw per picture and channel, spread over the whole latent; scaled by the step's noise level.
    per_channel = shift.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-5)
    assert per_channel.abs().mean() > 0.05


def test_the_offset_noise_stage_runs_alone_from_an_exported_generator_and_changes_only_the_unet(
    tmp_path: Path,
) -> None:
    import json

    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from lab.shapes.train import build_unet, export_generator, train

    torch.manual_seed(0)
    write_clip_tokenizer(tmp_path / "tokenizer")
    vae = build_vae()
    vae.register_to_config(scaling_factor=0.5)
    text_encoder = CLIPTextModel(clip_config().text_config)
    export_generator(tmp_path / "weights", text_encoder, vae, build_unet(), load_clip_tokenizer(tmp_path / "tokenizer"))
    generator = tmp_path / "weights" / "generator"
    before = {
        part: load_file(next((generator / part).glob("*.safetensors"))) for part in ("unet", "vae", "text_encoder")
    }
    config = TrainConfig(offset_steps=2, unet_batch=4, checkpoint_seconds=0.0)
    train(tmp_path / "run", config, export_to=tmp_path / "weights", only=["unet_offset"])

    after = {part: load_file(next((generator / part).glob("*.safetensors"))) for part in before}
    for part in ("vae", "text_encoder"):
        assert all(torch.equal(before[part][key], after[part][key]) for key in before[part]), part
    assert any(not torch.equal(before["unet"][key], after["unet"][key]) for key in before["unet"])
    assert "_name_or_path" not in json.loads((generator / "vae" / "config.json").read_text())
    assert json.loads((generator / "vae" / "config.json").read_text())["scaling_factor"] == 0.5
    assert json.loads((tmp_path / "weights" / "training.json").read_text())["stages"]["unet_offset"]["steps"] == 2
    with pytest.raises(FileNotFoundError, match="holds none"):
        train(tmp_path / "other", config, export_to=tmp_path / "empty", only=["unet_offset"])
    # The background stage goes on from that export the same way.
    config = TrainConfig(background_steps=2, background_batch=4, checkpoint_seconds=0.0)
    train(tmp_path / "run", config, export_to=tmp_path / "weights", only=["unet_background"])
    record = json.loads((tmp_path / "weights" / "training.json").read_text())["stages"]
    assert record["unet_background"]["steps"] == 2 and record["unet_offset"]["steps"] == 2


def test_the_background_stage_batches_uniform_named_backgrounds_and_their_colour_twins() -> None:
    from lab.shapes.train import background_batch
    from pictoprompt.models.shapes.scenes import HELD_OUT_COMBOS, PALETTE

    batch = background_batch(0, 3, 16, 0.5, 0.5)
    assert batch.pixels.shape == (16, 3, 32, 32) and len(batch.captions) == 16
    targeted = batch.captions[8:]
    # Every targeted caption names its background, and its twin swaps the object's and the background's colours.
    assert all(caption.endswith(" background") for caption in targeted)
    for first, twin, twin_background in zip(targeted[:4], targeted[4:], batch.backgrounds[12:], strict=True):
        colours = [word for word in first.split() if word in PALETTE]
        assert [word for word in twin.split() if word in PALETTE] == colours[::-1]
        expected = torch.tensor(PALETTE[colours[0]], dtype=torch.float32) / 127.5 - 1.0
        assert torch.allclose(twin_background.flatten(), expected)  # the twin's background: the object's colour
    assert not any(f"{colour} {shape}" in caption for caption in targeted for colour, shape in HELD_OUT_COMBOS)
    assert batch.captions[:8] == background_batch(0, 3, 16, 0.5, 0.5).captions[:8]  # deterministic


def test_a_stage_with_no_minutes_takes_no_step_and_saves_its_starting_weights(tmp_path: Path) -> None:
    from lab.shapes.train import _run_stage
    from pictoprompt.progress import Progress

    model = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    taken: list[int] = []

    def step_fn(step: int) -> dict[str, float]:
        taken.append(step)
        return {}

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _run_stage("off", 100, 0.0, tmp_path, TrainConfig(), {"model": model}, optimizer, 0.1, step_fn, Progress())
    assert taken == []
    saved = torch.load(tmp_path / "off.pt", weights_only=False)
    assert saved["step"] == 0 and saved["done"]
    assert all(torch.equal(saved["model"][k], before[k]) for k in before)


def test_the_free_views_stage_runs_alone_from_an_exported_clip_and_leaves_its_text_tower_alone(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lab.shapes.train import export_clip, train

    torch.manual_seed(0)
    export_clip(tmp_path / "weights", CLIPModel(clip_config()))
    before = load_file(tmp_path / "weights" / "clip" / "model.safetensors")
    config = TrainConfig(views_steps=3, vision_batch=8, checkpoint_seconds=0.0)
    train(tmp_path / "run", config, export_to=tmp_path / "weights", only=["clip_views"])

    after = load_file(tmp_path / "weights" / "clip" / "model.safetensors")
    text = [key for key in before if key.startswith("text_model.")]
    assert text and all(torch.equal(before[key], after[key]) for key in text)
    assert not torch.equal(before["visual_projection.weight"], after["visual_projection.weight"])
    assert not (tmp_path / "weights" / "generator").exists()
    assert torch.load(tmp_path / "run" / "clip_views.pt", weights_only=False)["step"] == 3
    with pytest.raises(FileNotFoundError, match="holds no"):
        train(tmp_path / "other", config, export_to=tmp_path / "empty", only=["clip_views"])
