"""Training and validation photographs for the shipped model, from two Debian packages.

Fetches `mate-backgrounds` and `plasma-workspace-wallpapers` (bookworm, pinned by SHA-256) from
deb.debian.org, keeps only the photographs (mate's nature folder and the plasma wallpapers that
are photos rather than artwork), takes each plasma wallpaper at its largest size, and downscales
every photo with a Lanczos filter to a short side of SHORT_SIDE pixels: that averages away the
JPEG blocks and sensor noise of the originals, so the HQ side of a training pair is clean.

Writes (all under OUT, default `data/`, which git ignores):
  OUT/photos/train/NAME.png  the training photographs
  OUT/photos/val/NAME_a.png, NAME_b.png  two 512x512 crops of each validation photograph

Run through tools/fetch-data.sh, which also makes the (HQ, LQ) validation pairs with
`engine degrade`. Needs Pillow (the script's venv pins it); nothing else is downloaded.
"""

import hashlib
import io
import os
import sys
import tarfile
import urllib.request

from PIL import Image

MIRROR = "http://deb.debian.org/debian/"
PACKAGES = [
    ("pool/main/m/mate-backgrounds/mate-backgrounds_1.26.0-1_all.deb",
     "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04"),
    ("pool/main/p/plasma-workspace-wallpapers/plasma-workspace-wallpapers_5.27.5-2_all.deb",
     "32cd18b71c8c938a18b3b351f217c02ac590e323caa3cf322fbb875ce8892f8b"),
]
# The plasma wallpapers that are photographs (the others are vector artwork).
PLASMA_PHOTOS = ["BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf",
                 "Grey", "Kite", "OneStandsOut", "Path", "summer_1am"]
# Held out for validation: varied content (boats and sky, a forest path, macro with bokeh, sand
# and grass, water drops).
VALIDATION = ["EveningGlow", "Path", "LadyBird", "Dune", "RainDrops"]
SHORT_SIDE = 768
VAL_CROP = 512


def fetch(path, sha256, cache):
    os.makedirs(cache, exist_ok=True)
    local = os.path.join(cache, os.path.basename(path))
    if not os.path.exists(local):
        print(f"fetching {MIRROR}{path}", flush=True)
        data = urllib.request.urlopen(MIRROR + path, timeout=120).read()
        tmp = local + ".part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
    data = open(local, "rb").read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        sys.exit(f"{local}: SHA-256 {digest}, expected {sha256}; delete it and run again")
    return data


def data_tar(deb, name):
    """The data.tar.xz member of a .deb (an `ar` archive)."""
    if not deb.startswith(b"!<arch>\n"):
        sys.exit(f"{name}: not a Debian package")
    pos = 8
    while pos < len(deb):
        header = deb[pos:pos + 60]
        member = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode())
        body = deb[pos + 60:pos + 60 + size]
        if member.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body))
        pos += 60 + size + (size % 2)
    sys.exit(f"{name}: no data.tar member")


def photographs(cache):
    """(name, PIL image) of every photograph in the two packages."""
    mate, plasma = (data_tar(fetch(p, s, cache), p) for p, s in PACKAGES)
    out = []
    for m in mate.getmembers():
        if m.isfile() and "/backgrounds/mate/nature/" in m.name and m.name.lower().endswith(".jpg"):
            out.append((os.path.splitext(os.path.basename(m.name))[0], mate.extractfile(m).read()))
    sizes = {}
    for m in plasma.getmembers():
        parts = m.name.split("/")
        if m.isfile() and "wallpapers" in parts and parts[-2] == "images":
            name = parts[parts.index("wallpapers") + 1]
            w = int(os.path.splitext(parts[-1])[0].split("x")[0])
            if name in PLASMA_PHOTOS and w > sizes.get(name, (0, None))[0]:
                sizes[name] = (w, m)
    missing = set(PLASMA_PHOTOS) - set(sizes)
    if missing:
        sys.exit(f"plasma-workspace-wallpapers: no images for {sorted(missing)}")
    for name, (_, m) in sorted(sizes.items()):
        out.append((name, plasma.extractfile(m).read()))
    return [(name, Image.open(io.BytesIO(data)).convert("RGB")) for name, data in sorted(out)]


def save(img, path):
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "data"
    train_dir, val_dir = os.path.join(out, "photos", "train"), os.path.join(out, "photos", "val")
    os.makedirs(train_dir, exist_ok=True)
    os.makedirs(val_dir, exist_ok=True)
    photos = photographs(os.path.join(out, "debs"))
    names = {n for n, _ in photos}
    if not set(VALIDATION) <= names:
        sys.exit(f"validation photographs missing: {sorted(set(VALIDATION) - names)}")
    for name, img in photos:
        f = SHORT_SIDE / min(img.size)
        img = img.resize((round(img.width * f), round(img.height * f)), Image.LANCZOS)
        if name in VALIDATION:
            top = (img.height - VAL_CROP) // 2
            for tag, left in [("a", 0), ("b", img.width - VAL_CROP)]:
                save(img.crop((left, top, left + VAL_CROP, top + VAL_CROP)), os.path.join(val_dir, f"{name}_{tag}.png"))
        else:
            save(img, os.path.join(train_dir, f"{name}.png"))
    print(f"{len(photos) - len(VALIDATION)} training photographs in {train_dir}, "
          f"{2 * len(VALIDATION)} validation crops in {val_dir}")


if __name__ == "__main__":
    main()
