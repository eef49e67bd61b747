"""Procedural multi-modal scenes with exact ground truth, ray-cast with vectorised numpy (torch-free).

A scene is 2-5 primitives (sphere, box, cylinder, cone) standing on a textured ground plane under a sky, seen by a
pinhole camera at a random pose and field of view, lit by a directional sun with hard shadows and an ambient term.
Per pixel it yields colour, metric z-depth (distance along the optical axis, sky clamped to `FAR_M`), a semantic
class (sky, ground, one per primitive kind) and the unit surface normal in camera axes (x right, y down, z forward;
a surface facing the camera has negative z; sky is the zero vector). The per-image label `cls` is the primitive kind
covering the most pixels. Sample i of seed s depends only on (s, i), so any number of processes renders the same set.

World axes: y up, ground at y = 0. Ray arrays are flat: N rays, o [N,3] origins, d [N,3] unit directions.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["CLASS_NAMES", "FAR_M", "SEMSEG_CLASSES", "render_sample", "render_scene", "write_synth"]

logger = logging.getLogger(__name__)

SEMSEG_CLASSES = ("sky", "ground", "sphere", "box", "cylinder", "cone")
"""Semantic class ids of the synthetic set (id = index)."""
CLASS_NAMES = ("sphere", "box", "cylinder", "cone")
"""Per-image labels (`cls`): the primitive kind with the largest visible area."""
FAR_M = 65.535
"""Depth given to sky and to ground beyond it (the largest 16-bit value at 1 mm per unit)."""
_EPS = 1e-4
_INF = np.float64(np.inf)


@dataclass
class _Prim:
    kind: int  # index into CLASS_NAMES
    center: np.ndarray  # base centre on the ground (sphere: its centre)
    radius: float
    height: float
    angle: float  # rotation about y (box)
    color: np.ndarray
    pattern: int  # 0 plain, 1 stripes, 2 checker
    pattern_scale: float
    color2: np.ndarray


def _hit_sphere(o, d, p: _Prim):
    oc = o - p.center
    b = np.einsum("ij,ij->i", d, oc) if oc.ndim == 2 else d @ oc
    c = np.einsum("ij,ij->i", oc, oc) - p.radius**2 if oc.ndim == 2 else oc @ oc - p.radius**2
    disc = b * b - c
    sq = np.sqrt(np.maximum(disc, 0))
    t = -b - sq
    t = np.where(t > _EPS, t, -b + sq)
    return np.where((disc > 0) & (t > _EPS), t, _INF)


def _normal_sphere(pts, p: _Prim):
    return (pts - p.center) / p.radius


def _rot(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _box_local(o, d, p: _Prim):
    rot = _rot(p.angle)
    centre = p.center + np.array([0.0, p.height / 2, 0.0])
    return (o - centre) @ rot, d @ rot, np.array([p.radius, p.height / 2, p.radius * 0.8])


def _hit_box(o, d, p: _Prim):
    lo, ld, half = _box_local(o, d, p)
    ld = np.where(np.abs(ld) < 1e-12, 1e-12, ld)
    t1, t2 = (-half - lo) / ld, (half - lo) / ld
    tmin = np.minimum(t1, t2).max(axis=1)
    tmax = np.maximum(t1, t2).min(axis=1)
    t = np.where(tmin > _EPS, tmin, tmax)
    return np.where((tmax >= tmin) & (t > _EPS), t, _INF)


def _normal_box(pts, p: _Prim):
    rot = _rot(p.angle)
    centre = p.center + np.array([0.0, p.height / 2, 0.0])
    half = np.array([p.radius, p.height / 2, p.radius * 0.8])
    q = ((pts - centre) @ rot) / half
    axis = np.abs(q).argmax(axis=1)
    n = np.zeros_like(q)
    n[np.arange(len(q)), axis] = np.sign(q[np.arange(len(q)), axis])
    return n @ rot.T


def _hit_cylinder(o, d, p: _Prim):
    ox, oz = o[..., 0] - p.center[0], o[..., 2] - p.center[2]
    dx, dz = d[:, 0], d[:, 2]
    a = np.maximum(dx * dx + dz * dz, 1e-12)
    b = ox * dx + oz * dz
    c = ox * ox + oz * oz - p.radius**2
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0))
    best = np.full(len(d), _INF)
    oy = o[..., 1]
    for t in ((-b - sq) / a, (-b + sq) / a):
        y = oy + t * d[:, 1]
        ok = (disc > 0) & (t > _EPS) & (y >= 0) & (y <= p.height)
        best = np.where(ok & (t < best), t, best)
    dy = np.where(np.abs(d[:, 1]) < 1e-12, 1e-12, d[:, 1])
    tc = (p.height - oy) / dy
    cx, cz = ox + tc * dx, oz + tc * dz
    ok = (tc > _EPS) & (cx * cx + cz * cz <= p.radius**2)
    return np.where(ok & (tc < best), tc, best)


def _normal_cylinder(pts, p: _Prim):
    n = np.zeros_like(pts)
    top = pts[:, 1] >= p.height - 1e-6
    n[:, 0] = (pts[:, 0] - p.center[0]) / p.radius
    n[:, 2] = (pts[:, 2] - p.center[2]) / p.radius
    n[top] = (0.0, 1.0, 0.0)
    return n


def _hit_cone(o, d, p: _Prim):
    # x'^2 + z'^2 = k^2 (h - y)^2 for 0 <= y <= h (apex at y = h).
    k2 = (p.radius / p.height) ** 2
    ox, oz = o[..., 0] - p.center[0], o[..., 2] - p.center[2]
    q = p.height - o[..., 1]
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    a = dx * dx + dz * dz - k2 * dy * dy
    a = np.where(np.abs(a) < 1e-12, 1e-12, a)
    b = ox * dx + oz * dz + k2 * q * dy
    c = ox * ox + oz * oz - k2 * q * q
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0))
    best = np.full(len(d), _INF)
    for t in ((-b - sq) / a, (-b + sq) / a):
        y = o[..., 1] + t * dy
        ok = (disc > 0) & (t > _EPS) & (y >= 0) & (y <= p.height)
        best = np.where(ok & (t < best), t, best)
    return best


def _normal_cone(pts, p: _Prim):
    k2 = (p.radius / p.height) ** 2
    n = np.stack([pts[:, 0] - p.center[0], k2 * (p.height - pts[:, 1]), pts[:, 2] - p.center[2]], axis=1)
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


_HIT = (_hit_sphere, _hit_box, _hit_cylinder, _hit_cone)
_NORMAL = (_normal_sphere, _normal_box, _normal_cylinder, _normal_cone)


def _random_color(rng: np.random.Generator) -> np.ndarray:
    h = rng.random()
    s = rng.uniform(0.3, 0.95)
    v = rng.uniform(0.35, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    pq = (v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s))
    table = [(v, pq[2], pq[0]), (pq[1], v, pq[0]), (pq[0], v, pq[2]), (pq[0], pq[1], v), (pq[2], pq[0], v),
             (v, pq[0], pq[1])]
    return np.array(table[i])


def _make_prims(rng: np.random.Generator) -> list[_Prim]:
    prims: list[_Prim] = []
    for _ in range(int(rng.integers(2, 6))):
        for _try in range(30):
            kind = int(rng.integers(0, len(CLASS_NAMES)))
            radius = float(rng.uniform(0.3, 0.8))
            pos = rng.uniform(-2.2, 2.2, size=2)
            if all(np.hypot(*(pos - q.center[[0, 2]])) > radius + q.radius * 1.3 + 0.1 for q in prims):
                break
        else:
            continue
        height = float(radius * rng.uniform(1.0, 3.0))
        centre = np.array([pos[0], radius if kind == 0 else 0.0, pos[1]])
        prims.append(_Prim(kind, centre, radius, height, float(rng.uniform(0, math.pi)), _random_color(rng),
                           int(rng.integers(0, 3)), float(rng.uniform(3, 10)), _random_color(rng)))
    return prims


def _pattern(pts, local, pattern: int, scale: float, c1, c2):
    if pattern == 0:
        return np.broadcast_to(c1, pts.shape).copy()
    if pattern == 1:
        on = np.sin(local[:, 1] * scale * 2) > 0
    else:
        on = (np.floor(local[:, 0] * scale / 2) + np.floor(local[:, 1] * scale / 2)
              + np.floor(local[:, 2] * scale / 2)) % 2 == 0
    return np.where(on[:, None], c1, c2)


def _camera(rng: np.random.Generator, size: int):
    azimuth = rng.uniform(0, 2 * math.pi)
    dist = rng.uniform(4.5, 7.5)
    eye = np.array([dist * math.cos(azimuth), rng.uniform(0.8, 3.0), dist * math.sin(azimuth)])
    target = np.array([rng.uniform(-0.5, 0.5), rng.uniform(0.2, 0.8), rng.uniform(-0.5, 0.5)])
    fwd = target - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    tan = math.tan(math.radians(rng.uniform(45, 65)) / 2)
    px = ((np.arange(size) + 0.5) / size * 2 - 1) * tan
    u, v = np.meshgrid(px, px)  # v grows downwards
    d = fwd[None] + u.reshape(-1, 1) * right[None] - v.reshape(-1, 1) * up[None]
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return eye, d, (right, up, fwd)


def _first_hits(o, d, prims: list[_Prim]):
    """Nearest hit per ray: (t, index) with index -1 = ground, -2 = nothing (sky)."""
    n = len(d)
    t_best = np.full(n, _INF)
    idx = np.full(n, -2, dtype=np.int64)
    dy = d[:, 1]
    oy = o[..., 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        tg = np.where(dy < -1e-9, -oy / np.where(dy < -1e-9, dy, -1.0), _INF)
    tg = np.where(tg > _EPS, tg, _INF)
    better = tg < t_best
    t_best, idx = np.where(better, tg, t_best), np.where(better, -1, idx)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i, p in enumerate(prims):
            t = _HIT[p.kind](o, d, p)
            better = t < t_best
            t_best, idx = np.where(better, t, t_best), np.where(better, i, idx)
    return t_best, idx


def render_scene(rng: np.random.Generator, size: int) -> dict[str, Any]:
    """One scene: rgb uint8 [S,S,3], depth float32 [S,S] (m), semseg int32 [S,S], normal float32 [S,S,3], cls."""
    for _attempt in range(20):
        prims = _make_prims(rng)
        eye, d, (right, up, fwd) = _camera(rng, size)
        t, idx = _first_hits(eye, d, prims)
        counts = np.bincount(idx[idx >= 0], minlength=len(prims))
        if prims and counts.sum() > 0:
            break
    n_rays = len(d)
    hit = idx > -2
    pts = eye[None] + d * np.where(hit, t, 0)[:, None]

    semseg = np.zeros(n_rays, dtype=np.int32)
    semseg[idx == -1] = 1
    normal_w = np.zeros((n_rays, 3))
    normal_w[idx == -1] = (0.0, 1.0, 0.0)
    albedo = np.zeros((n_rays, 3))
    g = idx == -1
    ground_c1, ground_c2 = _random_color(rng) * 0.8, _random_color(rng) * 0.8
    gp = int(rng.integers(0, 3))
    albedo[g] = _pattern(pts[g], pts[g][:, [0, 2, 0]] * [1, 1, 0], gp, float(rng.uniform(1, 4)), ground_c1,
                         ground_c2)
    # Fade the ground texture to its mean colour with distance: a cheap stand-in for anti-aliasing (no moire).
    fade = np.clip((t[g] - 6.0) / 14.0, 0, 1)[:, None]
    albedo[g] = albedo[g] * (1 - fade) + 0.5 * (ground_c1 + ground_c2) * fade if gp else albedo[g]
    for i, p in enumerate(prims):
        m = idx == i
        if not m.any():
            continue
        semseg[m] = 2 + p.kind
        normal_w[m] = _NORMAL[p.kind](pts[m], p)
        albedo[m] = _pattern(pts[m], pts[m] - p.center, p.pattern, p.pattern_scale, p.color, p.color2)

    # Light: directional sun with hard shadows, hemispheric ambient, a little specular.
    sun_el, sun_az = rng.uniform(math.radians(25), math.radians(70)), rng.uniform(0, 2 * math.pi)
    sun = np.array([math.cos(sun_el) * math.cos(sun_az), math.sin(sun_el), math.cos(sun_el) * math.sin(sun_az)])
    zenith, horizon = _random_color(rng) * [0.6, 0.8, 1.0], rng.uniform(0.6, 1.0, 3)
    lam = np.clip(normal_w @ sun, 0, None)
    lit = hit & (lam > 0)
    shadow_o = pts[lit] + normal_w[lit] * 1e-3
    if lit.any():
        _, sidx = _first_hits(shadow_o, np.broadcast_to(sun, shadow_o.shape), prims)
        lam[np.flatnonzero(lit)[sidx >= 0]] = 0.0
    ambient = 0.25 + 0.15 * normal_w[:, 1:2]
    sky_light = ambient * (0.5 * (zenith + horizon))
    half = sun[None] - d
    half /= np.maximum(np.linalg.norm(half, axis=1, keepdims=True), 1e-12)
    spec = (np.clip(np.einsum("ij,ij->i", normal_w, half), 0, 1) ** 40 * (lam > 0))[:, None] * 0.4
    colour = albedo * (sky_light + lam[:, None] * rng.uniform(0.8, 1.2)) + spec
    sky_t = np.clip(d[:, 1:2], 0, 1) ** 0.6
    colour = np.where(hit[:, None], colour, horizon * (1 - sky_t) + zenith * sky_t)
    colour = np.clip(colour, 0, 1) ** (1 / 2.2) * 255 + rng.normal(0, 1.5, colour.shape)
    rgb = np.clip(np.rint(colour), 0, 255).astype(np.uint8).reshape(size, size, 3)

    zdepth = np.where(hit, t * (d @ fwd), FAR_M)
    depth = np.minimum(zdepth, FAR_M).astype(np.float32).reshape(size, size)
    normal_cam = np.stack([normal_w @ right, -(normal_w @ up), normal_w @ fwd], axis=1)
    kinds = np.zeros(len(CLASS_NAMES), dtype=np.int64)
    for i, p in enumerate(prims):
        kinds[p.kind] += counts[i] if i < len(counts) else 0
    return {
        "rgb": rgb,
        "depth": depth,
        "semseg": semseg.reshape(size, size),
        "normal": normal_cam.astype(np.float32).reshape(size, size, 3),
        "cls": int(kinds.argmax()),
    }


def render_sample(seed: int, index: int, size: int = 224) -> dict[str, Any]:
    """Sample `index` of the data set with `seed` (independent of how the set is split across processes)."""
    return render_scene(np.random.default_rng([seed, index]), size)


def _render_encoded(args: tuple[int, int, int, Mapping[str, Any]]) -> tuple[str, dict[str, bytes], tuple]:
    from multimae_core.data.shards import encode_sample

    seed, index, size, encodings = args
    sample = render_sample(seed, index, size)
    return f"{index:08d}", encode_sample(sample, encodings), sample["rgb"].shape[:2]


def write_synth(url: str, num: int, *, size: int = 224, seed: int = 0, samples_per_shard: int = 256,
                num_workers: int | None = None, progress: bool = False, overwrite: bool = False,
                rgb_format: str = "png", storage_options: Mapping[str, Any] | None = None):
    """Render `num` scenes into a shard folder at `url`; returns the written Manifest.

    Rendering and PNG encoding run in `num_workers` processes (default: all cores); shards are written in index
    order, so the output is byte-identical for a given (num, size, seed, samples_per_shard).
    """
    from multimae_core.data.shards import DEFAULT_ENCODINGS, Encoding, ShardWriter

    if num < 1 or size < 8:
        raise ValueError(f"synth needs num >= 1 and size >= 8, got num={num}, size={size}")
    encodings = dict(DEFAULT_ENCODINGS)
    encodings["rgb"] = Encoding("jpg" if rgb_format in ("jpg", "jpeg") else "png8")
    jobs = [(seed, i, size, encodings) for i in range(num)]
    workers = min(num_workers or os.cpu_count() or 1, max(1, num // 8))
    # fork, and before the writer opens its filesystem: the children then inherit no threads (s3fs runs an event
    # loop thread) and need no importable __main__ (spawn would re-import the caller's script).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = mp.get_context(method).Pool(workers) if workers > 1 else None
    bar = None
    try:
        writer = ShardWriter(
            url, modalities=["rgb", "depth", "semseg", "normal"], encodings=encodings,
            samples_per_shard=samples_per_shard, class_names=CLASS_NAMES, semseg_classes=SEMSEG_CLASSES,
            extra={"generator": "mmae synth", "seed": seed, "size": size,
                   "depth": f"z-depth in metres, sky at {FAR_M}", "normal": "camera axes x right, y down, z forward"},
            overwrite=overwrite, storage_options=storage_options,
        )
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num, desc="synth", unit="img")
        if pool is None:
            _drain(map(_render_encoded, jobs), writer, bar)
        else:
            chunk = max(1, min(16, num // (workers * 4)))
            _drain(pool.imap(_render_encoded, jobs, chunksize=chunk), writer, bar)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    return writer.close()


def _drain(results, writer, bar) -> None:
    for key, files, hw in results:
        writer.write_encoded(key, files, size=hw)
        if bar is not None:
            bar.update(1)
