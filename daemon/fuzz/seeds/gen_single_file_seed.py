#!/usr/bin/env python3
"""Writes seeds/safetensors/sdxl-single-file-layout: the tensor names of the tiny single-file SDXL
fixture (daemon/tests/fixtures/diffusion/tiny-sdxl-single.safetensors) with every tensor shrunk
to 2 (or, for the fused q/k/v projections, 3) rows of one f16 value, so the safetensors fuzz
target starts from headers that reach the single-file name mapping and shape inference.

    python3 daemon/fuzz/seeds/gen_single_file_seed.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "..", "tests", "fixtures", "diffusion", "tiny-sdxl-single.safetensors")

with open(SRC, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
header.pop("__metadata__", None)
out, at = {}, 0
for name, t in sorted(header.items()):
    rows = 3 if "in_proj" in name else 2
    shape = [rows, 1] if len(t["shape"]) >= 2 else [rows]
    out[name] = {"dtype": "F16", "shape": shape, "data_offsets": [at, at + 2 * rows]}
    at += 2 * rows
text = json.dumps(out, separators=(",", ":")).encode()
path = os.path.join(HERE, "safetensors", "sdxl-single-file-layout")
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"\0" * at)
print(path, os.path.getsize(path))
