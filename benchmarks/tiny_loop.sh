#!/usr/bin/env bash
# The README's offline loop on a tiny local base, timed: train x2, merge, gen, export, add, list.
# Usage: bash benchmarks/tiny_loop.sh   (prints the total wall time; uses a temporary CDIFF_HOME)
set -euo pipefail
work="$(mktemp -d)"
export CDIFF_HOME="$work/home" HF_HUB_OFFLINE=1
python - "$work" <<'PY'
import sys
from pathlib import Path
from PIL import Image, ImageDraw
root = Path(sys.argv[1])
for name, colour in (("imgs", (200, 40, 40)), ("chair", (40, 40, 200))):
    (root / name).mkdir()
    for i in range(5):
        im = Image.new("RGB", (96, 80), (30 * i, 160, 90))
        ImageDraw.Draw(im).rectangle((10 + 4 * i, 12, 60, 64), fill=colour)
        im.save(root / name / f"{i}.png")
PY
cd "$work"
start=$(date +%s.%N)
python -m cdiff_cli.testing.tiny ./tiny-base >/dev/null
cdiff -q train mycat ./imgs --class cat --base ./tiny-base --resolution 64 --steps 20 --num-reg 8
cdiff -q train mychair ./chair --class chair --base ./tiny-base --resolution 64 --steps 20 --num-reg 8
cdiff -q merge mycat mychair
cdiff -q gen "<mycat> cat on a <mychair> chair" -n 2
cdiff -q export mycat+mychair -o ./export >/dev/null
cdiff -q add again ./export --base ./tiny-base --token '<cat2>' --token '<chair2>' --class cat --class chair
cdiff list
end=$(date +%s.%N)
python -c "print(f'tiny loop: {float($end) - float($start):.1f} s')"
rm -rf "$work"
