"""`python -m digits.grid OUT.png ARTIFACT [ARTIFACT ...]`: a grid of generated digits from kiln
artifacts (the README's picture): per artifact two rows, "a handwritten digit N" and "the number
WORD", N = 0..9, at the family's default steps and guidance, each image with its own seed."""
from __future__ import annotations

import argparse
from pathlib import Path


def grid(artifacts: list[Path], seed: int = 0, scale: int = 1):
    import numpy as np
    from PIL import Image

    from digits import data
    from exporters.judges import seeded_images
    from runtime import families, load_pipeline

    rows = []
    for folder in artifacts:
        pipe = load_pipeline(folder)
        pipe.set_progress_bar_config(disable=True)
        defaults = families.get(pipe.manifest.family).request_defaults
        jobs = [(p, seed + i) for i, (p, _) in enumerate(data.all_prompts())]
        images = seeded_images(pipe, jobs, int(pipe.manifest.profile["shapes"]["batch"][2]),
                               num_inference_steps=defaults["steps"], guidance_scale=defaults["guidance_scale"])
        rows += [np.concatenate(list(images[r * 10:(r + 1) * 10]), axis=1) for r in range(2)]
    picture = Image.fromarray((np.concatenate(rows, axis=0) * 255).round().astype(np.uint8))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST) if scale > 1 else picture


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m digits.grid", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=1)
    args = parser.parse_args(argv)
    grid(args.artifacts, args.seed, args.scale).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
