"""A stand-in for OpenFace 2's FeatureExtraction binary (the real one is a C++ build, the user's).

It accepts OpenFace's documented command line for an image sequence (``-fdir DIR -out_dir OUT
-of NAME -aus`` and optionally ``-q``; anything else fails as OpenFace would not be asked for it)
and writes ``OUT/NAME.csv`` in OpenFace's layout: the header with its leading spaces, one row per
image in name order, ``frame`` from 1, ``success`` 0 for a blank (uniform) image. Each AU
intensity is a fixed function of the image (the mean of one colour channel over one horizontal
band, times 5), so different frames give different AUs and identical frames identical ones.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

SCRIPT = r'''#!{python}
import sys
from pathlib import Path

import numpy as np
from PIL import Image

AUS = {aus!r}
args = sys.argv[1:]
if {fail!r}:
    print("Could not find the HAAR face detector location", file=sys.stderr)
    sys.exit(1)
opts = {{}}
i = 0
while i < len(args):
    if args[i] in ("-fdir", "-out_dir", "-of"):
        opts[args[i]] = args[i + 1]
        i += 2
    elif args[i] in ("-aus", "-q"):
        opts[args[i]] = True
        i += 1
    else:
        print(f"unexpected argument {{args[i]}}", file=sys.stderr)
        sys.exit(2)
if not {{"-fdir", "-out_dir", "-of", "-aus"}} <= set(opts):
    print(f"missing arguments: {{args}}", file=sys.stderr)
    sys.exit(2)
images = sorted(p for p in Path(opts["-fdir"]).iterdir() if p.suffix in (".png", ".jpg", ".bmp"))
header = ["frame", "face_id", "timestamp", "confidence", "success"] + [f"{{a}}_r" for a in AUS] + [f"{{a}}_c" for a in AUS]
rows = [", ".join(header)]
for k, path in enumerate(images, start=1):
    x = np.asarray(Image.open(path).convert("RGB"), np.float64) / 255  # [H, W, 3]
    found = x.std() > 0.01
    bands = np.array_split(np.arange(x.shape[0]), len(AUS))
    r = [5 * x[b, :, j % 3].mean() for j, b in enumerate(bands)]
    c = [float(v > 1) for v in r]
    rows.append(", ".join([str(k), "0", f"{{(k - 1) * 0.04:.3f}}", "0.98" if found else "0", str(int(found))]
                          + [f"{{v:.4f}}" for v in r] + [f"{{v:g}}" for v in c]))
Path(opts["-out_dir"]).mkdir(parents=True, exist_ok=True)
(Path(opts["-out_dir"]) / (opts["-of"] + ".csv")).write_text("\n".join(rows) + "\n")
'''


def write_fake_openface(folder: Path, *, fail: bool = False) -> Path:
    """folder/FeatureExtraction: an executable stand-in (see the module docstring); with ``fail``
    it prints an OpenFace-like error and exits 1."""
    from talk3d.evaluate.action_units import AU_INTENSITIES, OPENFACE_BINARY

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / OPENFACE_BINARY
    path.write_text(SCRIPT.format(python=sys.executable, aus=AU_INTENSITIES, fail=fail))
    os.chmod(path, 0o755)
    return path
