"""A light Franka Panda for the CPU renderer.

TinyRenderer's cost follows triangle count: the stock Panda visual meshes hold ~100k triangles per
arm and a 128 px frame with two arms takes ~50 ms. Vertex clustering brings them to ~10k and the
frame to ~13 ms. The renderer ignores OBJ diffuse colours and samples only the texture, so each
face keeps the colour it samples from the Panda's palette texture (white shell, dark joint caps):
faces are grouped by that colour, snapped to one clustering grid, and pointed into a tiny palette
texture of our own. Output depends only on the source files and the constants below, so it is
cached under a hash of both and is byte-identical on every machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# Bump when the algorithm changes: the cache key includes it.
VERSION = 3
# Clustering grid size in metres: 12 mm takes an arm from ~100k to ~10k faces and still reads
# as a Panda at 128-384 px.
CELL = 0.012
# Sampled colours closer than this (0-255 scale) share a group, so one material is not split.
COLOR_STEP = 24
ACCENT_LIFT = 0.002  # metres
PALETTE_CELL = 4  # palette texels per colour side: UVs sit in the middle, no bleeding
PALETTE_SLOTS = 8  # colours per palette row


def panda_dir() -> Path:
    import pybullet_data

    return Path(pybullet_data.getDataPath()) / "franka_panda"


def cache_root() -> Path:
    env = os.environ.get("LFTK_CACHE")
    if env:
        return Path(env) / "sim"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lftk" / "sim"


def _read_obj(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions (V, 3), per-face corner position indices (F, 3), per-face UV centroid (F, 2)."""
    verts, uvs, faces, face_uv = [], [], [], []
    for line in path.read_text().splitlines():
        if line.startswith("v "):
            verts.append([float(x) for x in line.split()[1:4]])
        elif line.startswith("vt "):
            uvs.append([float(x) for x in line.split()[1:3]])
        elif line.startswith("f "):
            corners = [c.split("/") for c in line.split()[1:]]
            idx = [int(c[0]) - 1 for c in corners]
            tex = [int(c[1]) - 1 if len(c) > 1 and c[1] else -1 for c in corners]
            for k in range(1, len(idx) - 1):  # fan-triangulate (the Panda's are triangles already)
                faces.append([idx[0], idx[k], idx[k + 1]])
                face_uv.append([tex[0], tex[k], tex[k + 1]])
    uv = np.array(uvs + [[0.5, 0.5]], dtype=np.float64)  # pybullet reads a missing UV as the centre
    fuv = np.array(face_uv, dtype=np.int64)
    return np.array(verts, dtype=np.float64), np.array(faces, dtype=np.int64), uv[fuv].mean(axis=1)


def _face_colors(face_uv: np.ndarray, texture: np.ndarray) -> np.ndarray:
    h, w, _ = texture.shape
    rows = np.clip(((1.0 - face_uv[:, 1]) * h).astype(np.int64), 0, h - 1)
    cols = np.clip((face_uv[:, 0] * w).astype(np.int64), 0, w - 1)
    return texture[rows, cols].astype(np.int64)


def _cluster(verts: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertex clustering: one vertex (the mean) per occupied grid cell, and the old->new map.
    One map for the whole mesh, so colour groups still meet without cracks."""
    keys = np.floor(verts / cell).astype(np.int64)
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    n = int(inverse.max()) + 1
    sums = np.zeros((n, 3))
    np.add.at(sums, inverse, verts)
    return sums / np.bincount(inverse, minlength=n)[:, None], inverse


def _collapse(faces: np.ndarray) -> np.ndarray:
    """Drop faces that lost a corner, and repeats over the same three vertices (keep the first)."""
    f = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    _, uniq = np.unique(np.sort(f, axis=1), axis=0, return_index=True)
    return f[np.sort(uniq)]


def _vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = verts[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # area-weighted
    vn = np.zeros_like(verts)
    for k in range(3):
        np.add.at(vn, faces[:, k], fn)
    norm = np.linalg.norm(vn, axis=1, keepdims=True)
    return vn / np.where(norm > 0, norm, 1.0)


def decimate_obj(src: Path, texture: np.ndarray, palette: list[tuple[int, int, int]], cell: float) -> str:
    """OBJ text of the decimated mesh; new colours are appended to `palette` (shared per arm)."""
    verts, faces, face_uv = _read_obj(src)
    colors = _face_colors(face_uv, texture)
    groups = (colors + COLOR_STEP // 2) // COLOR_STEP
    lines = [f"# decimated from {src.name} by lftk.sim.meshes v{VERSION}", "mtllib palette.mtl",
             "usemtl palette"]
    cells, remap = _cluster(verts, cell)
    # Normals over all groups, so neighbouring groups shade alike and lift alike (no cracks).
    normals = _vertex_normals(cells, _collapse(remap[faces]))
    out_v, out_n, out_f = [], [], []
    offset = 0
    keys = np.unique(groups, axis=0)
    brightest = keys.sum(axis=1).argmax()
    for tidx, key in enumerate(keys, start=1):
        sel = np.all(groups == key, axis=1)
        color = tuple(int(c) for c in np.median(colors[sel], axis=0).round())
        if color not in palette:
            palette.append(color)
        u, v = _palette_uv(palette.index(color))
        lines.append(f"vt {u:.6f} {v:.6f}")  # one texcoord per colour group
        gf = _collapse(remap[faces[sel]])
        used = np.unique(gf)
        compact = np.zeros(len(cells), dtype=np.int64)
        compact[used] = np.arange(len(used))
        gv, gf, gn = cells[used], compact[gf], normals[used]
        if tidx - 1 != brightest:
            # Accents (joint caps) lie a hair above the white shell; after clustering the two
            # surfaces coincide and the shell would show through, so lift accents clear of it.
            gv = gv + gn * ACCENT_LIFT
        out_v.append(gv)
        out_n.append(gn)
        out_f.append(np.column_stack([gf + offset + 1, np.full(len(gf), tidx)]))
        offset += len(gv)
    for x, y, z in np.concatenate(out_v):
        lines.append(f"v {x:.6f} {y:.6f} {z:.6f}")
    for x, y, z in np.concatenate(out_n):
        lines.append(f"vn {x:.5f} {y:.5f} {z:.5f}")
    for a, b, c, t in np.concatenate(out_f):
        lines.append(f"f {a}/{t}/{a} {b}/{t}/{b} {c}/{t}/{c}")
    return "\n".join(lines) + "\n"


def _palette_uv(slot: int) -> tuple[float, float]:
    side = PALETTE_SLOTS * PALETTE_CELL
    col, row = slot % PALETTE_SLOTS, slot // PALETTE_SLOTS
    u = (col * PALETTE_CELL + PALETTE_CELL / 2) / side
    v = 1.0 - (row * PALETTE_CELL + PALETTE_CELL / 2) / side
    return u, v


def _palette_image(palette: list[tuple[int, int, int]]) -> Image.Image:
    side = PALETTE_SLOTS * PALETTE_CELL
    img = np.full((side, side, 3), 255, dtype=np.uint8)
    for slot, color in enumerate(palette):
        col, row = slot % PALETTE_SLOTS, slot // PALETTE_SLOTS
        img[row * PALETTE_CELL:(row + 1) * PALETTE_CELL, col * PALETTE_CELL:(col + 1) * PALETTE_CELL] = color
    return Image.fromarray(img, "RGB")


def _source_key(src: Path) -> str:
    # The path is in the key too: the URDF we write points at the stock collision meshes.
    h = hashlib.sha256(f"v{VERSION} {CELL} {COLOR_STEP} {ACCENT_LIFT} {PALETTE_SLOTS} {src}".encode())
    for path in sorted(src.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(src).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def light_panda_urdf(cache: Path | None = None) -> Path:
    """Path of a Panda URDF with decimated visual meshes; built once, then read from the cache."""
    src = panda_dir()
    name = f"panda-{_source_key(src)}"
    if cache is not None:
        return _build(src, cache / name)
    try:
        return _build(src, cache_root() / name)
    except OSError:  # read-only home (some containers): a per-user temp cache still works
        return _build(src, Path(tempfile.gettempdir()) / f"lftk-sim-{os.getuid()}" / name)


def _build(src: Path, root: Path) -> Path:
    urdf = root / "panda.urdf"
    if urdf.is_file():
        return urdf
    log.info("decimating the Panda meshes for the CPU renderer (once) -> %s", root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".panda-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    texture = np.asarray(Image.open(src / "meshes" / "visual" / "colors.png").convert("RGB"))
    palette: list[tuple[int, int, int]] = []
    urdf_text = (src / "panda.urdf").read_text()
    names = sorted(set(re.findall(r"package://meshes/visual/(\w+)\.obj", urdf_text)))
    for name in names:
        text = decimate_obj(src / "meshes" / "visual" / f"{name}.obj", texture, palette, CELL)
        (tmp / f"{name}.obj").write_text(text)
    if len(palette) > PALETTE_SLOTS**2:
        raise RuntimeError(f"Panda palette has {len(palette)} colours, room for {PALETTE_SLOTS**2}")
    _palette_image(palette).save(tmp / "palette.png")
    (tmp / "palette.mtl").write_text("newmtl palette\nKa 1 1 1\nKd 1 1 1\nmap_Kd palette.png\n")
    urdf_text = re.sub(r"package://meshes/visual/(\w+)\.obj", lambda m: f"{m.group(1)}.obj", urdf_text)
    # Collision meshes (and the two links that use them for looks) stay the stock ones.
    urdf_text = urdf_text.replace("package://meshes/collision/", f"{(src / 'meshes' / 'collision').as_posix()}/")
    (tmp / "panda.urdf").write_text(urdf_text)
    try:
        os.replace(tmp, root)
    except OSError:  # another process won the race; its result is byte-identical
        shutil.rmtree(tmp, ignore_errors=True)
    return urdf
