"""`domain_note` on `shapes`: is a photo told apart from the world's own pictures and from pictures drawn with PIL?

Run: `pictoprompt bench domain_note [--calibrate] [--profile shapes]`.

The statistic (`pictoprompt.methods.domain.flat_coverage`) is the share of a picture's VAE latents that the densest
few latent points explain; the profile's `domain_check.min_coverage` is its threshold.

- `--calibrate` prints that statistic's low percentiles on calibration pictures that no evaluation uses: 500
  training-like scenes (`random_scene` with a calibration seed), 200 free views of them (objects anywhere, any size
  and line width, `random_free_view`) and 300 pictures drawn with PIL by the harness with a calibration seed. The
  profile's threshold is their pooled 1st percentile, rounded down to two decimals.
- Without it, the evaluation: the share of pictures that get a note, on every colour and grey photo of
  `skimage.data` that ships with scikit-image (longest side resized to 256 px; floor: at least 95 %), on the
  world's held-out scenes (67 single, 67 two-object, 67 held-out colour-shape combinations; floor: at most 5 %),
  and on the harness's 60 drawn pictures (`outside_set`, floor: at most 5 %). Each photo's coverage is printed.
"""

from __future__ import annotations

import argparse
import random
import statistics

import numpy as np
from PIL import Image

from lab.benchmarks.harness import outside_set, print_table, scene_set
from lab.shapes.world import random_free_view, random_scene, render_free_view
from pictoprompt.methods.domain import domain_note, flat_coverage
from pictoprompt.models.profiles import get_profile
from pictoprompt.models.runtime import Runtime
from pictoprompt.models.shapes.scenes import render_scene

CALIBRATION_SEED = "domain-note-calibration"
DRAWN_CALIBRATION_SEED = 5_000_011
"""Not the harness's `OUTSIDE_SEED` (7,000,003), whose first 60 pictures are the evaluation's."""
PHOTO_SIDE = 256
PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)
"""`skimage.data`'s photos that ship with scikit-image (the others need a download), besides the two views of
`stereo_motorcycle` and the first face of `lfw_subset`; its drawings (`logo`, `colorwheel`, `horse`, `checkerboard`,
`binary_blobs`, `shepp_logan_phantom`) are not photos."""


def photos() -> dict[str, Image.Image]:
    """Every photo, RGB, its longest side resized to `PHOTO_SIDE`."""
    import skimage.data as data

    arrays = {name: getattr(data, name)() for name in PHOTOS}
    left, right, _ = data.stereo_motorcycle()
    arrays |= {"motorcycle (left)": left, "motorcycle (right)": right}
    arrays["lfw face"] = (data.lfw_subset()[0] * 255).astype(np.uint8)
    result = {}
    for name, array in arrays.items():
        image = Image.fromarray(array).convert("RGB")
        scale = PHOTO_SIDE / max(image.size)
        result[name] = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    return result


def calibration_sets() -> dict[str, list[Image.Image]]:
    rng = random.Random(CALIBRATION_SEED)
    scenes = [random_scene(rng) for _ in range(500)]
    free = [Image.fromarray(render_free_view(s, random_free_view(s, rng))) for s in scenes[:200]]
    return {
        "training-like scenes": [render_scene(s) for s in scenes],
        "free views": free,
        "drawn (PIL)": [ex.flat for ex in outside_set(300, DRAWN_CALIBRATION_SEED)],
    }


def calibrate(runtime: Runtime) -> None:
    check = runtime.profile.domain_check
    pipeline = runtime.pipeline()
    pooled, rows = [], []
    for name, images in calibration_sets().items():
        values = [flat_coverage(pipeline, image, check) for image in images]
        pooled += values
        rows.append({"pictures": f"{name} ({len(values)})", **percentiles(values)})
    rows.append({"pictures": f"pooled ({len(pooled)})", **percentiles(pooled)})
    print_table("Flat-region coverage on the calibration pictures", rows)
    print(f"threshold (pooled 1st percentile, rounded down): {np.floor(100 * np.percentile(pooled, 1)) / 100:.2f}")


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(values, q)) for q in (0, 1, 2, 5, 50)}


def evaluate(runtime: Runtime) -> None:
    check = runtime.profile.domain_check
    pipeline = runtime.pipeline()
    sets = {
        "skimage photos": list(photos().items()),
        "held-out scenes": [
            (f"{kind} {i}", ex.image)
            for kind in ("single", "two", "held_out_combos")
            for i, ex in enumerate(scene_set(kind, 67))
        ],
        "drawn (PIL)": [(f"drawn {i}", ex.flat) for i, ex in enumerate(outside_set(60))],
    }
    rows = []
    for name, named in sets.items():
        notes = [domain_note(pipeline, [image], check) is not None for _, image in named]
        coverage = [flat_coverage(pipeline, image, check) for _, image in named]
        rows.append(
            {
                "pictures": f"{name} ({len(named)})",
                "note set %": 100 * statistics.fmean(notes),
                "median coverage": statistics.median(coverage),
                "min coverage": min(coverage),
            }
        )
        if name == "skimage photos":
            for (photo, _), value, note in zip(named, coverage, notes, strict=True):
                print(f"  {photo}: coverage {value:.3f}, note {'set' if note else 'NOT set'}")
    print_table(f"domain_note on {runtime.profile.name} (min_coverage {check.min_coverage})", rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pictoprompt bench domain_note", description=__doc__)
    parser.add_argument("--profile", default="shapes")
    parser.add_argument("--calibrate", action="store_true", help="print the calibration percentiles instead")
    settings = parser.parse_args(argv)
    runtime = Runtime(get_profile(settings.profile))
    if runtime.profile.domain_check is None:
        raise SystemExit(f"Profile '{settings.profile}' has no domain_check: its tools never add a note.")
    calibrate(runtime) if settings.calibrate else evaluate(runtime)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
