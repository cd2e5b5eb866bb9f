"""Hostile images (issue 14, sec. 3) get a clear error or a plan, in bounded memory, never a crash.

Each case runs in a child process limited to 3 GB of address space (RLIMIT_AS), forked from one runner
that imported vlmkit once; the child loads the hand-made file (tests/crafted_images.py) with load_image
and plans it under a scheme's reference preset with plan_image, then reports its outcome and its peak
resident set (getrusage ru_maxrss). Each peak must stay under 1 GB: before the schemes bounded their
work, `dual` needed about 4 GB for the 20000 x 1 PNG (a 4,480,000 x 224 resize) and `pad` about 17 GB
for the 65500 x 1 PNG (a 65500 x 65500 square).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import crafted_images
import numpy as np
import pytest
from PIL import Image
from test_serve import MODEL, Server, request, user

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
LIMIT = 3 << 30  # address space of the runner and its children
PEAK = 1 << 30  # resident-set bound of every case

# The runner: reads cases (file, scheme or null) as JSON lines on stdin, forks a child per case and prints
# one JSON line per case; finally the runner's largest child peak (RUSAGE_CHILDREN).
RUNNER = r"""
import json, os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
from vlmkit.image.load import ImageLoadError, load_image
from vlmkit.image.plan import ImagePlanError
from vlmkit.presets import get_preset
from vlmkit.schemes import get_scheme, plan_image
for line in sys.stdin:
    path, scheme = json.loads(line)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            import torch
            torch.set_num_threads(1)
            image = load_image(path)
            if scheme is None:
                out = {"outcome": "loaded", "size": list(image.size)}
            else:
                plan = plan_image(get_preset(get_scheme(scheme).reference_preset), image)
                out = {"outcome": "planned", "shape": list(plan.pixel_values.shape), "tokens": plan.num_tokens}
        except BaseException as e:  # the test reports any failure, MemoryError included
            out = {"outcome": type(e).__name__, "message": str(e), "load_error": isinstance(e, ImageLoadError),
                   "plan_error": isinstance(e, ImagePlanError)}
        out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        result = f.read()
    os.waitpid(pid, 0)
    print(result or json.dumps({"outcome": "child died"}), flush=True)
print(json.dumps({"children_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}), flush=True)
""".replace("ADDRESS_SPACE", str(LIMIT))

SCHEMES = ("pad", "anyres", "hd", "tiles", "slices", "dynamic", "dual", "sam", "hybrid")
# What each scheme does with a 20000 x 1 / 65500 x 1 image, worked out from its preprocessing:
#   pad      the padded square's rows resampled to 336: (1, 3, 336, 336), 576 tokens; no square made
#   anyres   every pinpoint keeps 0 whole rows of a 1 px high strip; the least wasted canvas wins, the
#            smallest (2 tiles): base + 2 tiles, (3, 3, 336, 336)
#   hd       16 crops along the long side, one row: 1 + 16 views of 336
#   tiles    the same rule over DeepSeek-VL2's candidates: the one-tile canvas, global + 1 tile (2, 3, 384, 384)
#   slices   not sliced (20000 px < 448**2): one source view about 448**2 px, 14 px high
#   dynamic  aspect ratio above 200: ValueError "crop or pad it first" (Qwen2-VL's own rule)
#   dual     CLIP's short side 224 makes a 4,480,000 x 224 (or 14,672,000 x 224) image: ImagePlanError
#   sam      a squashed 1024 x 1024 view
#   hybrid   long side 1024 (short side 14), padded: (1, 3, 384, 384)
PLANNED_SHAPE = {"pad": [1, 3, 336, 336], "anyres": [3, 3, 336, 336], "hd": [17, 3, 336, 336],
                 "tiles": [2, 3, 384, 384], "sam": [1, 3, 1024, 1024], "hybrid": [1, 3, 384, 384]}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bounds")
    made = {"20000x1.png": crafted_images.wide_png(20000), "65500x1.png": crafted_images.wide_png(65500),
            "2x16777219.tif": crafted_images.tall_tiff_header(),
            "missing-dimensions.tif": crafted_images.missing_dimensions_tiff()}
    for name, data in made.items():
        (base / name).write_bytes(data)
    return {name: base / name for name in made}


@pytest.fixture(scope="module")
def outcomes(files) -> dict[tuple[str, str | None], dict]:
    """Every case's outcome, from one runner process."""
    cases = [(name, scheme) for name in ("20000x1.png", "65500x1.png") for scheme in SCHEMES]
    cases += [("2x16777219.tif", None), ("missing-dimensions.tif", None)]
    stdin = "".join(json.dumps([str(files[name]), scheme]) + "\n" for name, scheme in cases)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=stdin, capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == len(cases) + 1, proc.stdout
    for (name, scheme), out in zip(cases, lines):  # shown with pytest -s
        print(f"{name:24} {scheme or 'load':8} {out['outcome']:15} peak RSS {out['peak'] / 2**20:6.0f} MiB")
    print(f"largest peak of all cases: {lines[-1]['children_peak'] / 2**20:.0f} MiB")
    assert lines[-1]["children_peak"] < PEAK, lines[-1]
    return dict(zip(cases, lines[:-1]))


@pytest.mark.parametrize("name", ["20000x1.png", "65500x1.png"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_long_thin_png_is_planned_or_refused_in_bounded_memory(outcomes, name, scheme):
    out = outcomes[name, scheme]
    assert out["peak"] < PEAK, out
    size = name.removesuffix(".png")
    if scheme == "dual":
        assert out["outcome"] == "ImagePlanError" and out["plan_error"] and out["load_error"], out
        for said in (f"a {size} image", "image_scheme='dual'", "MiB", "256 MiB", "crop it or resize it"):
            assert said in out["message"], out
    elif scheme == "dynamic":
        assert out["outcome"] == "ValueError" and "aspect ratio" in out["message"] and "crop" in out["message"], out
    else:
        assert out["outcome"] == "planned", out
        if scheme == "slices":  # one source view 14 px high, 64 resampler queries
            assert out["shape"][:3] == [1, 3, 14] and out["tokens"] == 64, out
        else:
            assert out["shape"] == PLANNED_SHAPE[scheme], out
    if scheme == "pad":
        assert out["tokens"] == (336 // 14) ** 2, out


def test_a_side_over_65535_is_refused_from_the_header(outcomes, files):
    out = outcomes["2x16777219.tif", None]
    assert out["outcome"] == "ImageLoadError" and out["peak"] < PEAK, out
    assert out["message"].startswith(str(files["2x16777219.tif"])), out
    assert "2x16777219" in out["message"] and "65535" in out["message"] and "crop it or resize it" in out["message"]


def test_a_multipage_tiff_missing_its_dimensions_is_an_image_load_error(outcomes, files):
    out = outcomes["missing-dimensions.tif", None]
    assert out["outcome"] == "ImageLoadError" and out["peak"] < PEAK, out
    assert out["message"].startswith(str(files["missing-dimensions.tif"])), out
    assert "TypeError: Missing dimensions" in out["message"], out


def test_the_crafted_tiff_is_the_issues_188_bytes_and_trips_pillow():
    """The oracle for the case above: unwrapped, Pillow itself raises TypeError on this file."""
    import io

    from PIL import Image

    data = crafted_images.missing_dimensions_tiff()
    assert len(data) == 188
    image = Image.open(io.BytesIO(data))
    assert image.size == (1, 1)
    with pytest.raises(TypeError, match="Missing dimensions"):
        _ = image.n_frames


@pytest.fixture(scope="module")
def dual_server():
    from vlmkit.serve import create_app
    from vlmkit.train.run import fresh_model

    s = Server(create_app(fresh_model("vary-base-small", "", 0), model_name="vary-base-small"))
    yield s
    s.stop()


def _data_url(data: bytes) -> str:
    import base64
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_the_server_answers_400_to_an_image_its_scheme_cannot_plan_in_bounds(dual_server):
    """Vary's dual scheme would resize the 20000 x 1 PNG to 4,480,000 x 224: a 400 naming the cause."""
    status, body = request(dual_server.url + "/v1/chat/completions",
                           {"model": "vary-base-small", "max_tokens": 2,
                            "messages": user("x", _data_url(crafted_images.wide_png(20000)))})
    assert status == 400, body
    message = body["error"]["message"]
    assert "20000x1" in message and "image_scheme='dual'" in message and "crop it or resize it" in message, body
    status, body = request(dual_server.url + "/v1/chat/completions",
                           {"model": "vary-base-small", "max_tokens": 2,
                            "messages": user("x", _data_url(crafted_images.missing_dimensions_tiff()))})
    assert status == 400 and "Missing dimensions" in body["error"]["message"], body
    status, _ = request(dual_server.url + "/health")
    assert status == 200


@pytest.fixture(scope="module")
def loaded_tiny():
    from vlmkit.load import load_model
    return load_model(MODEL)


def test_the_server_plans_the_20000_by_1_png_under_pad(loaded_tiny):
    """tiny-random's pad scheme resamples the padded square's rows without making the square: an answer."""
    from vlmkit.serve import create_app

    s = Server(create_app(loaded_tiny, model_name=MODEL))
    try:
        status, body = request(s.url + "/v1/chat/completions",
                               {"model": MODEL, "max_tokens": 2,
                                "messages": user("x", _data_url(crafted_images.wide_png(20000)))})
    finally:
        s.stop()
    assert status == 200, body


# ---- the cheaper paths give the reference's pixels ----------------------------------------------------------

def _noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(40, 20), (20, 40), (300, 1), (1, 300), (337, 500), (500, 337), (336, 100),
                                  (7, 3), (1000, 999)])
@pytest.mark.parametrize("side", [336, 32])
def test_square_resized_is_the_padded_square_resized(size, side, monkeypatch):
    """Oracle: LLaVA's expand2square as Pillow does it (the square canvas, pasted, then one bicubic resize)."""
    from vlmkit.image import pixels

    image = _noise(*size, seed=size[0] * 1000 + size[1])
    canvas = Image.new("RGB", (max(size),) * 2, (122, 116, 103))
    canvas.paste(image, ((max(size) - size[0]) // 2, (max(size) - size[1]) // 2))
    expected = canvas.resize((side, side), Image.Resampling.BICUBIC).tobytes()
    assert pixels.square_resized(image, (122, 116, 103), side).tobytes() == expected
    monkeypatch.setattr(pixels, "BAND_BYTES", 4 * max(size) * 3)  # a tall image in bands of 3 rows
    assert pixels.square_resized(image, (122, 116, 103), side).tobytes() == expected


@pytest.mark.parametrize("size", [(500, 1000), (1, 300), (335, 337), (100, 5000), (1200, 3000)])
@pytest.mark.parametrize("max_crops", [1, 4, 16])
def test_hd_transform_of_a_tall_image_is_the_reference_transposed_path(size, max_crops):
    """Oracle: the reference HD_transform for a tall image: transpose, bilinear resize, pad white, transpose."""
    import math

    from vlmkit.schemes.hd import CROP, hd_resized_size, hd_transform

    image = _noise(*size, seed=size[0] + size[1])
    turned = image.transpose(Image.Transpose.TRANSPOSE)
    new_w, new_h = hd_resized_size(*turned.size, max_crops)
    resized = turned.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = math.ceil(new_h / CROP) * CROP
    canvas = Image.new("RGB", (new_w, target), (255, 255, 255))
    canvas.paste(resized, (0, (target - new_h) // 2))
    expected = canvas.transpose(Image.Transpose.TRANSPOSE).tobytes()
    assert hd_transform(image, max_crops).tobytes() == expected


def test_check_work_refuses_before_planning_and_counts_a_clip_at_once():
    """The bound is checked from the size alone: plan() never runs for a refused image (a stub image with a
    size but no pixels would fail there); a Qwen2-VL clip is estimated for all its frames at once."""
    from vlmkit.image.plan import ImagePlanError
    from vlmkit.presets import get_preset
    from vlmkit.schemes import get_scheme, plan_media
    from vlmkit.schemes.base import MAX_WORK_BYTES, check_work

    class SizeOnly(Image.Image):
        def __init__(self, size):
            super().__init__()
            self._size, self._mode = size, "RGB"

    with pytest.raises(ImagePlanError, match="a 20000x1 image: .*image_scheme='dual'"):
        plan_media(get_preset("vary-base"), [SizeOnly((20000, 1))])
    dynamic, cfg = get_scheme("dynamic"), get_preset("qwen2-vl")
    # 768 * 28 * 28 = 602,112 px per frame at most: 3 + 4 bytes per value per frame and 4 per temporal slot,
    # times 3 channels: over 7 MiB a frame, so a few dozen frames pass and a thousand do not.
    assert check_work(dynamic, cfg, (448, 448), frames=2) < MAX_WORK_BYTES
    with pytest.raises(ImagePlanError, match="a video of 1000 448x448 frames"):
        check_work(dynamic, cfg, (448, 448), frames=1000)
