"""Training, validation and test images for the shipped model, from Debian packages.

Fetches (bookworm, pinned by SHA-256, from deb.debian.org) `mate-backgrounds` and
`plasma-workspace-wallpapers`, the photographs among `lomiri-wallpapers-16.04`,
`lomiri-wallpapers-20.04` and `gnome-backgrounds`, and `ukui-wallpapers` (artwork, never trained
on: an independent test set of other content). Keeps only the photographs for training and
validation (mate's nature folder, the plasma wallpapers that are photos rather than artwork, each
at its largest size, and the lomiri and gnome photographs named below), and downscales every image
with a Lanczos filter to a short side of SHORT_SIDE pixels: that averages away the JPEG blocks and
sensor noise of the originals, so the HQ side of a pair is clean.

Writes (all under OUT, default `data/`, which git ignores):
  OUT/photos/train/NAME.png  the training photographs
  OUT/photos/val/NAME_a.png, NAME_b.png  two 512x512 crops of each validation photograph
  OUT/photos/test/NAME.png  a centre crop of TEST_CROP pixels of each ukui wallpaper

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
PACKAGES = {
    "mate": ("pool/main/m/mate-backgrounds/mate-backgrounds_1.26.0-1_all.deb",
             "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04"),
    "plasma": ("pool/main/p/plasma-workspace-wallpapers/plasma-workspace-wallpapers_5.27.5-2_all.deb",
               "32cd18b71c8c938a18b3b351f217c02ac590e323caa3cf322fbb875ce8892f8b"),
    "lomiri-16.04": ("pool/main/l/lomiri-wallpapers/lomiri-wallpapers-16.04_20.04.0-2_all.deb",
                     "a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab"),
    "lomiri-20.04": ("pool/main/l/lomiri-wallpapers/lomiri-wallpapers-20.04_20.04.0-2_all.deb",
                     "d44e89b8473aafe64a5b678f014862dc31335aaaf18665c544d985d854f1a709"),
    "gnome": ("pool/main/g/gnome-backgrounds/gnome-backgrounds_43.1-1_all.deb",
              "a670dea21572652127d6e55f9cdb3a226d0037854fdbfd037003c7d00ee0dc4e"),
    "ukui": ("pool/main/u/ukui-wallpapers/ukui-wallpapers_20.04.3-1.1_all.deb",
             "6d49be70152e6d603163458e177e501deb0be8f2916389ccbfcf59b0d7fc0262"),
}
# The lomiri and gnome wallpapers that are photographs (the others are artwork).
MORE_PHOTOS = {
    "lomiri-16.04": ["Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
                     "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "analogpattern_by_Peter_Nerlich",
                     "free_by_Peter_Nerlich", "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich",
                     "life_by_Aitzol_Berasategi", "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt",
                     "sunset_by_Aitzol_Berasategi"],
    "lomiri-20.04": ["Infinite-Sea_by_Aury88", "Kleiber_by_Lukas_Baubkus"],
    "gnome": ["wood-l"],
}
# The plasma wallpapers that are photographs (the others are vector artwork).
PLASMA_PHOTOS = ["BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf",
                 "Grey", "Kite", "OneStandsOut", "Path", "summer_1am"]
# Held out for validation: varied content (boats and sky, a forest path, macro with bokeh, sand
# and grass, water drops).
VALIDATION = ["EveningGlow", "Path", "LadyBird", "Dune", "RainDrops"]
SHORT_SIDE = 768
VAL_CROP = 512
TEST_CROP = 256


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


def members(tar, keep):
    """(name without extension, bytes) of the files of `tar` for which `keep(path)` holds."""
    return [(os.path.splitext(os.path.basename(m.name))[0], tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile() and keep(m.name)]


def images(cache):
    """(training and validation photographs, test images) as (name, PIL image) lists."""
    tars = {name: data_tar(fetch(p, s, cache), p) for name, (p, s) in PACKAGES.items()}
    out = members(tars["mate"], lambda n: "/backgrounds/mate/nature/" in n and n.lower().endswith(".jpg"))
    sizes = {}
    for m in tars["plasma"].getmembers():
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
        out.append((name, tars["plasma"].extractfile(m).read()))
    for package, names in MORE_PHOTOS.items():
        found = members(tars[package], lambda n, names=names: os.path.splitext(os.path.basename(n))[0] in names)
        if len(found) != len(names):
            sys.exit(f"{package}: expected {names}, found {sorted(n for n, _ in found)}")
        out.extend(found)
    test = members(tars["ukui"], lambda n: "/backgrounds/" in n and n.lower().endswith((".jpg", ".png")))
    decode = lambda items: [(name, Image.open(io.BytesIO(data)).convert("RGB")) for name, data in sorted(items)]
    return decode(out), decode(test)


def save(img, path):
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def shrink(img):
    """`img` with its short side SHORT_SIDE, Lanczos."""
    f = SHORT_SIDE / min(img.size)
    return img.resize((round(img.width * f), round(img.height * f)), Image.LANCZOS)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "data"
    dirs = {role: os.path.join(out, "photos", role) for role in ("train", "val", "test")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    photos, test = images(os.path.join(out, "debs"))
    names = {n for n, _ in photos}
    if not set(VALIDATION) <= names:
        sys.exit(f"validation photographs missing: {sorted(set(VALIDATION) - names)}")
    for name, img in photos:
        img = shrink(img)
        if name in VALIDATION:
            top = (img.height - VAL_CROP) // 2
            for tag, left in [("a", 0), ("b", img.width - VAL_CROP)]:
                save(img.crop((left, top, left + VAL_CROP, top + VAL_CROP)), os.path.join(dirs["val"], f"{name}_{tag}.png"))
        else:
            save(img, os.path.join(dirs["train"], f"{name}.png"))
    for name, img in test:
        img = shrink(img)
        left, top = (img.width - TEST_CROP) // 2, (img.height - TEST_CROP) // 2
        save(img.crop((left, top, left + TEST_CROP, top + TEST_CROP)), os.path.join(dirs["test"], f"{name}.png"))
    print(f"{len(photos) - len(VALIDATION)} training photographs in {dirs['train']}, "
          f"{2 * len(VALIDATION)} validation crops in {dirs['val']}, {len(test)} test crops in {dirs['test']}")


if __name__ == "__main__":
    main()
