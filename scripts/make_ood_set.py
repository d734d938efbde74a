#!/usr/bin/env python
r"""Build the out-of-distribution (OOD) evaluation set: images a user could upload that are not dermoscopic images.

    python scripts/make_ood_set.py --output runs/ood-set [--seed 0]

Everything comes from this machine: the photographs and graphics bundled with installed packages (matplotlib,
scikit-learn, gradio, networkx, sympy: found through their installed folders) and images rendered here. Writes
`OUTPUT/<category>/<name>.png` (or `.jpg`) and `OUTPUT/manifest.csv` (`file, category, source, part`). Categories:

- `photo`: the bundled natural photographs (portrait, animals, buildings, a bus, a flower, a temple), whole and as
  random crops (30-80 % of the side), in colour and grey;
- `graphic`: bundled logos, plots and graph drawings, and charts rendered with matplotlib;
- `text`: rendered text pages (several fonts, sizes, colours);
- `screenshot`: rendered application windows (title bar, buttons, text, a table);
- `noise`: uniform, Gaussian, salt-and-pepper, smooth (blurred) and coloured noise;
- `flat`: flat colours (skin tones among them) and linear gradients;
- `blur`: the photographs under a heavy Gaussian blur (radius 1/12 of the short side);
- `medical_other`: the bundled MRI slice and elevation maps rendered as images (not dermoscopy, but medical-looking).

`part` alternates `dev` / `report` inside each category: the gate's method was chosen on `dev` (with the
validation split as the in-distribution side), the figures are reported on `report` and on the whole set. No image
of this set is used to fit anything.
"""

import argparse
import csv
import gzip
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from modeling_skinlesion.cli import HelpFormatter  # noqa: E402

PHOTOS = (
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("gradio", "media_assets/images/cheetah.jpg"),
    ("gradio", "media_assets/images/cheetah1.jpg"),
    ("gradio", "test_data/cheetah2.jpg"),
    ("gradio", "media_assets/images/lion.jpg"),
    ("gradio", "media_assets/images/tower.jpg"),
    ("gradio", "media_assets/images/groot.jpeg"),
    ("gradio", "media_assets/images/bus.png"),
)
GRAPHICS = (
    ("matplotlib", "mpl-data/sample_data/logo2.png"),
    ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png"),
    ("matplotlib", "mpl-data/images/matplotlib_large.png"),
    ("gradio", "media_assets/images/hf-logo_transpng.png"),
    ("gradio", "media_assets/images/logo.png"),
    ("gradio", "media_assets/images/screenshot.gif"),
    ("networkx", "drawing/tests/baseline/test_display_complex.png"),
    ("networkx", "drawing/tests/baseline/test_display_labels_and_colors.png"),
    ("networkx", "drawing/tests/baseline/test_display_shortest_path.png"),
    ("networkx", "drawing/tests/baseline/test_house_with_colors.png"),
    ("sympy", "plotting/tests/test_region_and.png"),
    ("sympy", "plotting/tests/test_region_xor.png"),
)
SKIN_TONES = ((255, 224, 196), (234, 192, 160), (198, 134, 94), (141, 85, 54), (94, 58, 40), (224, 172, 138))
WORDS = (
    "the patient was seen in clinic today and a follow up visit is booked for next month results pending "
    "invoice total amount due please find attached the report lorem ipsum dolor sit amet consectetur"
).split()


def package_file(package: str, relative: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None


def rgb(image):
    from PIL import Image

    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def font(size: int, bold: bool = False, mono: bool = False):
    from PIL import ImageFont

    name = "DejaVuSansMono" if mono else "DejaVuSans"
    name += "-Bold.ttf" if bold else ".ttf"
    path = package_file("matplotlib", f"mpl-data/fonts/ttf/{name}")
    return ImageFont.truetype(str(path), size) if path else ImageFont.load_default(size)


def text_page(rng, width: int, height: int):
    from PIL import Image, ImageDraw

    background = tuple(int(v) for v in rng.choice([[255, 255, 255], [250, 246, 230], [30, 30, 30], [230, 240, 255]]))
    ink = (20, 20, 20) if sum(background) > 300 else (230, 230, 230)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(12, 40))
    face = font(size, bold=bool(rng.integers(2)), mono=bool(rng.integers(2)))
    y = int(rng.integers(5, 30))
    while y < height - size:
        line = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
        draw.text((int(rng.integers(5, 30)), y), line, fill=ink, font=face)
        y += int(size * rng.uniform(1.2, 1.8))
    return image


def screenshot(rng, width: int, height: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    bar = tuple(int(v) for v in rng.integers(40, 200, size=3))
    draw.rectangle([0, 0, width, 32], fill=bar)
    draw.text((10, 8), "Untitled - Editor", fill=(255, 255, 255), font=font(14, bold=True))
    for i, x in enumerate(range(width - 90, width - 10, 28)):
        draw.ellipse([x, 8, x + 16, 24], fill=[(230, 80, 70), (240, 190, 60), (90, 200, 90)][i % 3])
    draw.rectangle([0, 32, 140, height], fill=(225, 228, 235))
    for k, y in enumerate(range(50, height - 20, 30)):
        draw.text((12, y), f"Item {k + 1}", fill=(40, 40, 60), font=font(13))
    for row in range(int(rng.integers(3, 8))):
        y = 60 + row * 36
        for col in range(3):
            x = 160 + col * ((width - 180) // 3)
            draw.rectangle([x, y, x + (width - 200) // 3, y + 28], outline=(180, 180, 190), fill=(255, 255, 255))
            draw.text((x + 6, y + 6), str(rng.choice(WORDS)), fill=(30, 30, 30), font=font(12))
    button = tuple(int(v) for v in rng.integers(30, 220, size=3))
    draw.rounded_rectangle([width - 150, height - 50, width - 20, height - 15], 8, fill=button)
    draw.text((width - 130, height - 42), "Submit", fill=(255, 255, 255), font=font(14, bold=True))
    return image


def chart(rng, kind: str, width: int, height: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    figure = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    axes = figure.add_subplot()
    x = np.arange(30)
    if kind == "line":
        for _ in range(3):
            axes.plot(x, np.cumsum(rng.normal(size=30)))
    elif kind == "bar":
        axes.bar(range(8), rng.uniform(1, 10, size=8), color=plt.cm.tab10(np.arange(8)))
    elif kind == "scatter":
        axes.scatter(rng.normal(size=200), rng.normal(size=200), c=rng.uniform(size=200), cmap="viridis")
    else:
        axes.imshow(rng.normal(size=(20, 20)), cmap=str(rng.choice(["magma", "coolwarm", "viridis"])))
    axes.set_title(f"{kind} chart")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return Image.open(buffer).convert("RGB")


def noise(rng, kind: str, side: int):
    from PIL import Image, ImageFilter

    if kind == "uniform":
        array = rng.integers(0, 256, size=(side, side, 3))
    elif kind == "gaussian":
        array = np.clip(rng.normal(128, 50, size=(side, side, 3)), 0, 255)
    elif kind == "salt_pepper":
        array = np.full((side, side, 3), int(rng.integers(80, 180)))
        flips = rng.uniform(size=(side, side))
        array[flips < 0.1] = 0
        array[flips > 0.9] = 255
    elif kind == "smooth":
        small = rng.integers(0, 256, size=(side // 16, side // 16, 3)).astype(np.uint8)
        return Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
    else:  # coloured: a random tint over grey noise
        grey = rng.normal(0, 40, size=(side, side, 1))
        array = np.clip(rng.integers(0, 256, size=(1, 1, 3)) + grey, 0, 255)
    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    return image.filter(ImageFilter.GaussianBlur(1)) if kind == "gaussian" and rng.integers(2) else image


def flat(rng, index: int, side: int):
    from PIL import Image

    if index % 3 == 2:  # a linear gradient between two colours
        start, end = rng.integers(0, 256, size=(2, 3))
        ramp = np.linspace(0, 1, side)[:, None, None]
        array = start * (1 - ramp) + end * ramp
        array = np.broadcast_to(array, (side, side, 3))
        if rng.integers(2):
            array = array.transpose(1, 0, 2)
        return Image.fromarray(np.asarray(array, dtype=np.uint8))
    colour = SKIN_TONES[index % len(SKIN_TONES)] if index % 3 == 1 else tuple(int(v) for v in rng.integers(0, 256, 3))
    return Image.new("RGB", (side, side), colour)


def medical_other() -> list[tuple[str, object]]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from PIL import Image

    images = []
    path = package_file("matplotlib", "mpl-data/sample_data/s1045.ima.gz")
    if path:
        with gzip.open(path) as handle:
            slice_ = np.frombuffer(handle.read(), np.uint16).reshape(256, 256).astype(np.float32)
        grey = (slice_ / slice_.max() * 255).astype(np.uint8)
        images.append(("mri_slice", Image.fromarray(grey).convert("RGB")))
        images.append(("mri_slice_bone", Image.fromarray((colormaps["bone"](grey)[..., :3] * 255).astype(np.uint8))))
    for name in ("topobathy.npz", "jacksboro_fault_dem.npz"):
        path = package_file("matplotlib", f"mpl-data/sample_data/{name}")
        if path is None:
            continue
        with np.load(path) as data:
            elevation = data["topo"] if "topo" in data else data["elevation"]
        scaled = (elevation - elevation.min()) / max(float(np.ptp(elevation)), 1e-6)
        for cmap in ("gist_earth", "terrain", "gray"):
            colours = (colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)
            images.append((f"{Path(name).stem}_{cmap}", Image.fromarray(colours)))
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="Folder to write the set to.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the crops and the rendered images.")
    args = parser.parse_args(argv)

    global np
    import numpy as np
    from PIL import Image, ImageFilter, ImageOps

    rng = np.random.default_rng(args.seed)
    rows: list[tuple[str, str, str]] = []

    def add(category: str, name: str, image, source: str) -> None:
        folder = args.output / category
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        image.save(path)
        rows.append((str(path.relative_to(args.output)), category, source))

    photos = []
    for package, relative in PHOTOS:
        path = package_file(package, relative)
        if path is None:
            print(f"skipped {package}/{relative}: not installed", file=sys.stderr)
            continue
        photos.append((path.stem, rgb(Image.open(path)), f"{package}/{relative}"))
    for stem, photo, source in photos:
        add("photo", stem, photo, source)
        add("photo", f"{stem}_grey", ImageOps.grayscale(photo).convert("RGB"), source)
        for k in range(4):
            scale = rng.uniform(0.3, 0.8)
            width, height = photo.size
            side = int(min(width, height) * scale)
            x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            add("photo", f"{stem}_crop{k}", photo.crop((x, y, x + side, y + side)), source)
        radius = min(photo.size) / 12
        add("blur", f"{stem}_blur", photo.filter(ImageFilter.GaussianBlur(radius)), source)
        crop = photo.crop((0, 0, min(photo.size), min(photo.size)))
        add("blur", f"{stem}_square_blur", crop.filter(ImageFilter.GaussianBlur(radius)), source)
    for package, relative in GRAPHICS:
        path = package_file(package, relative)
        if path is not None:
            add("graphic", path.stem, rgb(Image.open(path)), f"{package}/{relative}")
    for k, kind in enumerate(["line", "bar", "scatter", "heatmap"] * 4):
        add("graphic", f"chart_{kind}_{k}", chart(rng, kind, int(rng.integers(300, 700)), 400), "rendered")
    for k in range(24):
        add("text", f"text_{k}", text_page(rng, int(rng.integers(300, 800)), int(rng.integers(250, 700))), "rendered")
    for k in range(16):
        add("screenshot", f"window_{k}", screenshot(rng, int(rng.integers(500, 900)), 450), "rendered")
    for k, kind in enumerate(["uniform", "gaussian", "salt_pepper", "smooth", "coloured"] * 5):
        add("noise", f"{kind}_{k}", noise(rng, kind, int(rng.integers(200, 600))), "rendered")
    for k in range(24):
        add("flat", f"flat_{k}", flat(rng, k, int(rng.integers(150, 500))), "rendered")
    for name, image in medical_other():
        add("medical_other", name, image, "matplotlib/mpl-data/sample_data")

    counts: dict[str, int] = {}
    with (args.output / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "category", "source", "part"])
        for file, category, source in rows:
            counts[category] = counts.get(category, 0) + 1
            writer.writerow([file, category, source, "dev" if counts[category] % 2 else "report"])
    print(f"Wrote {len(rows)} images to {args.output}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
