"""Writing an evaluation: metrics.md tables in the paper's layout, image grids, the mouth/audio plot."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["TABLE2_COLUMNS", "TABLE1_COLUMNS", "NOVEL_GT_COLUMNS", "markdown_report", "save_grid",
           "plot_mouth_vs_audio"]

METHOD = "Talk3D (ours)"
# (metrics.json key, column title): Table 2 (audio-driven) and Table 1 (per novel view).
TABLE2_COLUMNS = (("psnr", "PSNR ↑"), ("ssim", "SSIM ↑"), ("lpips", "LPIPS ↓"), ("fid", "FID ↓"),
                  ("lmd", "LMD ↓"), ("aue", "AUE ↓"), ("sync", "Sync ↑"), ("idsim", "IDSIM ↑"))
TABLE1_COLUMNS = (("sync", "Sync ↑"), ("fid", "FID ↓"), ("idsim", "IDSIM ↑"))  # per pose, as the paper
# Novel views against ground-truth views (the synthetic head rendered at each pose): a table of its own.
NOVEL_GT_COLUMNS = (("psnr", "PSNR ↑"), ("ssim", "SSIM ↑"), ("lpips", "LPIPS ↓"))
PLOT_W, PLOT_H, PLOT_MARGIN = 900, 320, 48
PLOT_COLORS = {"ground-truth mouth opening": (30, 30, 30), "audio energy (RMS)": (60, 120, 220),
               "rendered mouth opening (ours)": (220, 60, 40), "target-frame mouth opening": (40, 160, 80)}


def _column(metrics: dict, key: str) -> dict | None:
    """A table column's entry: 'sync' is the paper's LSE-C where SyncNet ran, else Wav2Lip's score."""
    if key == "sync" and metrics.get("lse_c", {}).get("available"):
        return metrics["lse_c"]
    return metrics.get(key)


def _cell(entry: dict | None) -> str:
    if not entry or not entry.get("available"):
        return "n/a"
    v = entry.get("mean")
    text = "n/a" if v is None else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    if entry.get("mouth_found", 0) < entry.get("mouth_of", 0):  # LMD over the frames whose mouth was found
        text += f" ({entry['mouth_found']}/{entry['mouth_of']} mouths found)"
    return text


def markdown_report(result: dict) -> str:
    """metrics.json's dict -> Markdown: Table 2 (audio-driven) and Table 1 (novel views), rows = methods."""
    lines = [f"# Evaluation of `{result['run']}`", "",
             f"Data `{result['data']}` ({result['source']}), split `{result['split']}`, {result['frames']} frames, "
             f"evaluated at {result['resolution']}x{result['resolution']}.", "",
             "## Audio-driven (Table 2)", ""]
    ad = result["protocols"]["audio_driven"]["metrics"]
    lines += ["| Method | " + " | ".join(t for _, t in TABLE2_COLUMNS) + " |",
              "| --- |" + " --- |" * len(TABLE2_COLUMNS),
              f"| {METHOD} | " + " | ".join(_cell(_column(ad, k)) for k, _ in TABLE2_COLUMNS) + " |", ""]
    sync_entry = ad.get("sync", {})
    if ad.get("lse_c", {}).get("available"):
        lse = ad["lse_c"]
        lines += [f"Sync is SyncNet's LSE-C ({lse['network']}): LSE-D {ad['lse_d']['mean']:.3f}, audio-video "
                  f"offset {lse['offset_frames']} frames, {lse['windows']} windows.", ""]
    elif sync_entry.get("available"):
        lines += [f"Sync here: {sync_entry['network']}. The paper's Sync is SyncNet's confidence (LSE-C, about "
                  "9 on real video): the two scales do not compare.", ""]
    aue = ad.get("aue", {})
    if aue.get("available"):
        lines += [f"AUE by face half: lower {aue['lower_face']:.4f}, upper {aue['upper_face']:.4f} "
                  f"({aue['frames']} of {aue['of']} frames tracked on both sides; {aue['tool']}).", ""]
    sync = result["protocols"]["audio_driven"].get("mouth_sync", {})
    if sync.get("available"):
        lines += [f"Mouth opening ({sync['measure']}) correlation: "
                  + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a"
                              for k, v in sync["correlations"].items()), ""]
    nv = result["protocols"]["novel_view"]["poses"]
    lines += ["## Novel views (Table 1)", "",
              "| Method | " + " | ".join(f"{t} ({p['yaw_deg']:g}°, {p['pitch_deg']:g}°)"
                                         for p in nv.values() for _, t in TABLE1_COLUMNS) + " |",
              "| --- |" + " --- |" * (len(TABLE1_COLUMNS) * len(nv)),
              f"| {METHOD} | " + " | ".join(_cell(_column(p["metrics"], k)) for p in nv.values()
                                           for k, _ in TABLE1_COLUMNS) + " |", ""]
    with_truth = [p for p in nv.values()
                  if any(p["metrics"].get(k, {}).get("available") for k, _ in NOVEL_GT_COLUMNS)]
    if with_truth:
        truth = with_truth[0].get("ground_truth", "rendered at each pose")
        lines += [f"Against the ground-truth views ({truth}):",
                  "", "| Head angle (yaw, pitch) | " + " | ".join(t for _, t in NOVEL_GT_COLUMNS) + " |",
                  "| --- |" + " --- |" * len(NOVEL_GT_COLUMNS)]
        lines += [f"| ({p['yaw_deg']:g}°, {p['pitch_deg']:g}°) | "
                  + " | ".join(_cell(p["metrics"].get(k)) for k, _ in NOVEL_GT_COLUMNS) + " |" for p in nv.values()]
        lines.append("")
    # Why a metric of the tables above is missing: each reason once, with the metrics and where.
    reasons: dict[str, dict[str, list[str]]] = {}
    shown = [("audio-driven", ad, TABLE2_COLUMNS)] + [
        (name, p["metrics"], TABLE1_COLUMNS + NOVEL_GT_COLUMNS) for name, p in nv.items()]
    for where, metrics, columns in shown:
        for k, _ in columns:
            e = _column(metrics, k)
            if e is not None and not e.get("available"):
                reasons.setdefault(e["reason"], {}).setdefault(k, []).append(where)
    if reasons:
        lines += ["## Not available", ""]
        for why, keys in reasons.items():
            what = []
            for k, wheres in keys.items():
                novel = [w for w in wheres if w != "audio-driven"]
                parts = ["audio-driven"] if "audio-driven" in wheres else []
                parts += ["every novel view"] if novel and len(novel) == len(nv) else novel
                what.append(f"{k} ({' and '.join(parts)})")
            lines.append(f"- {', '.join(what)}: {why}")
        lines.append("")
    return "\n".join(lines)


def save_grid(path, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """rows of (target, ours) [3, S, S] in [-1, 1] -> a PNG, one row per frame: target | ours."""
    strips = [torch.cat([t.float().clamp(-1, 1), o.float().clamp(-1, 1)], dim=2) for t, o in rows]
    grid = torch.cat(strips, dim=1)  # [3, rows S, 2 S]
    Image.fromarray(((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(path)


def plot_mouth_vs_audio(path, series: dict[str, np.ndarray], title: str) -> None:
    """Line plot of per-frame signals [N] (each min-max normalised to [0, 1]) with a legend, via PIL.
    A NaN value (a frame without a measure) leaves a gap in its line."""
    img = Image.new("RGB", (PLOT_W, PLOT_H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = PLOT_MARGIN, PLOT_MARGIN, PLOT_W - PLOT_MARGIN // 2, PLOT_H - PLOT_MARGIN
    d.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    d.text((x0, 8), title, fill=(0, 0, 0))
    d.text((x0, y1 + 8), "frame", fill=(0, 0, 0))
    for i, (name, values) in enumerate(series.items()):
        v = np.asarray(values, np.float64)
        ok = np.isfinite(v)
        if not ok.any():
            continue
        lo, span = v[ok].min(), v[ok].max() - v[ok].min()
        v = (v - lo) / span if span > 0 else np.where(ok, 0.5, np.nan)  # a flat signal sits mid-height
        xs = x0 + (np.arange(v.size) / max(v.size - 1, 1)) * (x1 - x0)
        ys = y1 - v * (y1 - y0)
        color = PLOT_COLORS.get(name, (120, 120, 120))
        # One line per run of finite values; a lone value is a dot.
        edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
        for start, stop in zip(edges[::2], edges[1::2]):
            pts = list(zip(xs[start:stop].tolist(), ys[start:stop].tolist()))
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            else:
                d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        d.text((x0 + 220 * (i % 4), 22 + 12 * (i // 4)), name, fill=color)  # above the box: lines never cross it
    img.save(path)
    return None


def finite_or_none(x) -> float | None:
    """A float for JSON: None for NaN / inf (strict JSON has neither)."""
    x = float(x)
    return x if math.isfinite(x) else None
