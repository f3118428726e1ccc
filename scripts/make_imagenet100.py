"""Build ImageNet-100 (the CMC 100-class subset) from a full ImageNet folder, for `dataset=imagenet100`.

    python scripts/make_imagenet100.py IMAGENET_DIR OUT_DIR [--copy] [--classes FILE]

IMAGENET_DIR must hold train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the validation images sorted into class
folders, as torchvision's ImageNet or the usual valprep script leave them). OUT_DIR/{train,val}/<wnid> become
symlinks to those class folders (or copies with --copy); then run with `dataset=imagenet100 data.root=OUT_DIR`.
Re-running is safe: links that already point at the right folder are kept, anything else there is an error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

SPLITS = ("train", "val")


class SubsetError(RuntimeError):
    """The source folder or the output folder is not as expected; the message names the path."""


def read_classes(path: Path | None) -> list[str]:
    if path is None:
        from vdg.data.datasets import imagenet100_classes

        return imagenet100_classes()
    classes = path.read_text().split()
    if len(set(classes)) != len(classes) or not classes:
        raise SubsetError(f"{path} must list unique class ids, one per line")
    return classes


def check_source(imagenet_dir: Path, classes: list[str]) -> None:
    """Every split exists in class-folder layout and holds every wanted class."""
    for split in SPLITS:
        folder = imagenet_dir / split
        if not folder.is_dir():
            raise SubsetError(f"{folder} does not exist; IMAGENET_DIR must hold train/ and val/ class folders")
        present = {d.name for d in folder.iterdir() if d.is_dir()}
        if split == "val" and not present and any(p.is_file() for p in folder.iterdir()):
            raise SubsetError(
                f"{folder} holds image files but no class folders: sort the validation images into "
                f"val/<wnid>/ first (e.g. with the ILSVRC2012 validation ground truth / valprep.sh)"
            )
        missing = [c for c in classes if c not in present]
        if missing:
            raise SubsetError(f"{folder} lacks {len(missing)} of the {len(classes)} classes, e.g. {missing[:5]}")


def place(source: Path, target: Path, copy: bool) -> None:
    """Link (or copy) one class folder; an existing identical link is kept, anything else is an error."""
    if target.is_symlink() and not copy:
        if target.resolve() == source.resolve():
            return
        raise SubsetError(f"{target} already links to {os.readlink(target)}, not {source}; remove it first")
    if target.exists() or target.is_symlink():
        raise SubsetError(f"{target} already exists; remove it or choose another OUT_DIR")
    if copy:
        shutil.copytree(source, target)
    else:
        target.symlink_to(source.resolve(), target_is_directory=True)


def make_subset(imagenet_dir: Path, out_dir: Path, classes: list[str], copy: bool = False) -> dict[str, int]:
    """Create out_dir/{train,val}/<wnid> for each class; returns the image count per split."""
    check_source(imagenet_dir, classes)
    counts = {}
    for split in SPLITS:
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        for wnid in classes:
            place(imagenet_dir / split / wnid, out_dir / split / wnid, copy)
        counts[split] = sum(sum(1 for p in (out_dir / split / c).iterdir() if p.is_file()) for c in classes)
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("imagenet_dir", type=Path, help="ImageNet root with train/<wnid>/ and val/<wnid>/")
    parser.add_argument("out_dir", type=Path, help="where to create train/ and val/ of the subset")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of symlinking class folders")
    parser.add_argument("--classes", type=Path, default=None, help="class-id list (default: vdg's ImageNet-100)")
    args = parser.parse_args(argv)
    try:
        classes = read_classes(args.classes)
        counts = make_subset(args.imagenet_dir, args.out_dir, classes, args.copy)
    except (SubsetError, OSError) as err:  # OSError: an unwritable OUT_DIR, a full disk
        parser.exit(2, f"error: {err}\n")
    print(f"ImageNet-{len(classes)} in {args.out_dir}: " + ", ".join(f"{k} {v:,} images" for k, v in counts.items()))
    return counts


if __name__ == "__main__":
    main(sys.argv[1:])
