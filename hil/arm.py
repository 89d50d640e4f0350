"""Real aarch64 run of the flight gate under user-mode QEMU (-cpu cortex-a57, Jetson Nano's CPU).

setup(): mmdebstrap an arm64 Debian bookworm root with python3 (extract only, no root needed), pip
         install aarch64 wheels of the flight dependencies into it, and give it a fake ARM
         /proc/cpuinfo and /sys CPU list matching the QEMU CPU model (onnxruntime and XNNPACK read
         them; the host's x86 files crash or silently disable XNNPACK).
check(): run the same scenes through flight on x86 and under qemu-aarch64; decisions must be identical
         on both backends. LiteRT masks must be bit-identical. ONNX Runtime's x86 (AVX2) and ARM
         INT8 kernels round a few near-tie pixels differently (measured: 6-8 pixels on 4 real scenes
         with v5; with v6 26 of 147 456 on the 38-Cloud patch, every one on a class boundary, and 90 of
         262 144 on the ukis S2 tile, 79 on a boundary and the rest within 2 px of one;
         quantizing with reduce_range does not remove it; ORT's maintainers call this expected,
         microsoft/onnxruntime#20479), so ORT masks may differ only near class boundaries of the x86
         mask (within near_boundary_px(), the card's stem stride: one cell of the model's coarser
         decision grid, where the top two scores are near a tie) and in at most ORT_MAX_PIXEL_DIFF of the pixels -- with the same actions.
         A wrong kernel, band or layout changes whole regions and fails either bound.
         Emulation is 100-700x slower: correctness only, never timing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .paths import REPO, SHARED_REAL

DEFAULT_ROOT = Path(os.environ.get("CLOUDGATE_ARM_ROOT", Path.home() / ".cache" / "cloudgate" / "arm64-root"))
QEMU_CPU = "cortex-a57"
WHEELS = ["numpy", "pyyaml", "onnxruntime", "ai-edge-litert"]
PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"]


def _pinned_wheels() -> list[str]:
    """Same versions as the host interpreter, so x86 and aarch64 run the same runtime code."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for w in WHEELS:
        try:
            out.append(f"{w}=={version(w)}")
        except PackageNotFoundError:
            out.append(w)
    return out
CHECK_SCENES = [  # small real scenes first: emulation is slow
    "unlabeled_eolearn_s2_refscenes/eolearn_refscene_0.npz",
    "unlabeled_eolearn_s2_refscenes/eolearn_refscene_2.npz",
    "cloud38_sample/cloud38_LC08_002053_20160520_patch192.npz",
    "ukis_csmask_tests/ukis_sentinel2.npz",
]
_CPUINFO_A57 = """processor\t: {i}
BogoMIPS\t: 38.40
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd07
CPU revision\t: 1

"""


def missing_tools() -> list[str]:
    return [t for t in ("qemu-aarch64-static", "mmdebstrap") if shutil.which(t) is None]


def root_ready(root: Path) -> bool:
    return (root / "usr/bin/python3.11").exists() and (root / "opt/site/onnxruntime").exists() and (root / ".cloudgate-ready").exists()


def setup(root: str | Path | None = None, cores: int = 4) -> int:
    root = Path(root) if root else DEFAULT_ROOT
    miss = missing_tools()
    if miss:
        print(f"arm-setup: missing {miss}; install with: apt-get install -y qemu-user-static mmdebstrap", file=sys.stderr)
        return 2
    if root_ready(root):
        print(f"arm-setup: {root} is ready")
        return 0
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "usr/bin/python3.11").exists():
        subprocess.run(["mmdebstrap", "--variant=extract", "--architectures=arm64",
                        "--include=python3,libstdc++6,libgcc-s1,libgomp1", "bookworm", str(root)], check=True)
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *plat,
                    "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                    "--target", str(root / "opt/site"), "--upgrade", *_pinned_wheels()], check=True)
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/cpuinfo").write_text("".join(_CPUINFO_A57.format(i=i) for i in range(cores)))
    cpu = root / "sys/devices/system/cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    for f in ("possible", "present", "online"):
        (cpu / f).write_text(f"0-{cores - 1}\n")
    for i in range(cores):
        (cpu / f"cpu{i}").mkdir(exist_ok=True)
        (cpu / f"cpu{i}/online").write_text("1\n")
    (root / ".cloudgate-ready").write_text("ok\n")
    print(f"arm-setup: ready at {root}")
    return 0


def _emulated_cmd(root: Path, args: list[str]) -> tuple[list[str], dict]:
    env = {"PYTHONPATH": f"{root / 'opt/site'}:{REPO}", "PATH": "/usr/bin:/bin", "HOME": "/tmp",
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    if "CLOUDGATE_MODELS" in os.environ:
        env["CLOUDGATE_MODELS"] = os.environ["CLOUDGATE_MODELS"]
    return ["qemu-aarch64-static", "-cpu", QEMU_CPU, "-L", str(root), str(root / "usr/bin/python3.11"), *args], env


def run_probe(scenes: list[Path], out: Path, backend: str, root: Path | None = None, timeout: float = 3600) -> dict:
    """Run hil.arm_probe natively (root None) or under QEMU; returns its JSON summary."""
    args = ["-m", "hil.arm_probe", "--out", str(out), "--backend", backend, *map(str, scenes)]
    if root is None:
        cmd, env = [sys.executable, *args], dict(os.environ, PYTHONPATH=str(REPO))
    else:
        cmd, env = _emulated_cmd(root, args)
    subprocess.run(cmd, cwd=str(REPO), env=env, check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    return json.loads((out.with_suffix(".json")).read_text())


ORT_MAX_PIXEL_DIFF = 1e-3  # share of a scene's pixels (measured with v6: up to 3.4e-4); see the module docstring


def near_boundary_px() -> int:
    """How far from a class boundary a near-tie flip may land: the shipped student's stem stride (card
    `stem_stride`, 4 for cloudgate-s4): its classes are decided on that much coarser a grid and upsampled, so a
    near-tie at low resolution flips a blob up to one coarse cell from the boundary."""
    from flight.model import default_card, load_card

    return int(load_card(default_card()).raw["stem_stride"])


def _neighbourhood(a: np.ndarray, fill):
    """The nine 3x3-shifted views of a (padded with `fill`: "edge" or a constant), each shaped like a."""
    h, w = a.shape
    p = np.pad(a, 1, mode="edge") if fill == "edge" else np.pad(a, 1, constant_values=fill)
    return (p[dy:dy + h, dx:dx + w] for dy in (0, 1, 2) for dx in (0, 1, 2))


def class_boundary(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Pixels within `radius` pixels (chessboard distance) of a pixel of another class (edges replicated)."""
    out = np.zeros(mask.shape, bool)
    for v in _neighbourhood(mask, "edge"):
        out |= v != mask
    for _ in range(radius - 1):                          # grow by one pixel per step (bounded by radius)
        grown = out.copy()
        for v in _neighbourhood(out, False):
            grown |= v
        out = grown
    return out


def mask_diffs(a_npz: Path, b_npz: Path) -> dict[str, tuple[int, int, int] | None]:
    """Per scene mask: (differing pixels, pixels, differing pixels farther than near_boundary_px() from a class
    boundary of a's mask), or None when missing or shaped differently in b."""
    out, near = {}, near_boundary_px()
    with np.load(a_npz) as za, np.load(b_npz) as zb:
        for k in za.files:
            if k not in zb.files or za[k].shape != zb[k].shape:
                out[k] = None
                continue
            a, diff = za[k], za[k] != zb[k]
            out[k] = (int(diff.sum()), a.size,
                      int((diff & ~class_boundary(a, near)).sum()) if diff.any() else 0)
    return out


def compare(a_npz: Path, b_npz: Path, a_json: dict, b_json: dict, max_pixel_diff: float = 0.0,
            diffs: dict | None = None) -> list[str]:
    """Problems between an x86 and an aarch64 run; masks may differ in max_pixel_diff of the pixels, and
    only within near_boundary_px() of class boundaries of the x86 mask (with max_pixel_diff 0, not at all).
    `diffs`: mask_diffs(a_npz, b_npz) when the caller already has it."""
    problems = []
    for sid, da in a_json.items():
        db = b_json.get(sid)
        if db is None:
            problems.append(f"{sid}: missing in aarch64 run")
            continue
        for k in ("action", "valid_fraction", "tiles_processed"):
            if da[k] != db[k]:
                problems.append(f"{sid}: {k} x86={da[k]} aarch64={db[k]}")
        if abs(da["cloud_fraction"] - db["cloud_fraction"]) > max_pixel_diff:
            problems.append(f"{sid}: cloud_fraction x86={da['cloud_fraction']} aarch64={db['cloud_fraction']}")
    for k, d in (diffs if diffs is not None else mask_diffs(a_npz, b_npz)).items():
        if d is None:
            problems.append(f"{k}: mask missing or of another shape in the aarch64 run")
        elif d[0] > max_pixel_diff * d[1]:
            problems.append(f"{k}: INT8 masks differ in {d[0]} of {d[1]} pixels")
        elif d[2]:
            problems.append(f"{k}: INT8 masks differ in {d[2]} pixels farther than {near_boundary_px()} px from a class "
                            f"boundary (of {d[0]} differing)")
    return problems


def check(root: str | Path | None = None, n_scenes: int = 3, backends=("litert", "onnxruntime")) -> int:
    root = Path(root) if root else DEFAULT_ROOT
    if not root_ready(root):
        print(f"arm-check: no aarch64 root at {root}; run: python -m hil arm-setup", file=sys.stderr)
        return 2
    scenes = [SHARED_REAL / s for s in CHECK_SCENES[:n_scenes] if (SHARED_REAL / s).exists()]
    if not scenes:
        print("arm-check: ../shared/data/real is absent", file=sys.stderr)
        return 2
    ok = True
    with tempfile.TemporaryDirectory() as td:
        for backend in backends:
            x86, arm = Path(td) / f"x86_{backend}.npz", Path(td) / f"arm_{backend}.npz"
            jx = run_probe(scenes, x86, backend)
            ja = run_probe(scenes, arm, backend, root=root)
            tol = 0.0 if backend == "litert" else ORT_MAX_PIXEL_DIFF
            diffs = mask_diffs(x86, arm)
            problems = compare(x86, arm, jx, ja, tol, diffs)
            ndiff = sum(d[0] for d in diffs.values() if d is not None)
            status = ("bit-identical" if ndiff == 0 else
                      f"same decisions, {ndiff} mask pixels differ, all near class boundaries (tolerance {tol:g})") \
                if not problems else "DIFFERENT"
            print(f"arm-check [{backend}] {len(scenes)} real scenes, qemu -cpu {QEMU_CPU}: {status}")
            for sid, d in jx.items():
                print(f"  {sid:40s} x86 {d['action']:9s} cf={d['cloud_fraction']:.4f} | aarch64 "
                      f"{ja.get(sid, {}).get('action', '?'):9s} cf={ja.get(sid, {}).get('cloud_fraction', float('nan')):.4f} "
                      f"machine={ja.get(sid, {}).get('machine', '?')}")
            for p in problems:
                print("  " + p)
            ok &= not problems
    return 0 if ok else 1
