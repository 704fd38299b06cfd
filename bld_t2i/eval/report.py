"""The evaluation report: one self-contained `index.html` that opens with no server.

Images are linked by paths relative to the output folder, so the folder can be copied or
opened straight from disk. Prompts are grouped by category; each prompt shows one grid
per setting side by side, its diversity and CLIP score, and (with a neighbour search)
every sample next to its nearest training latents with their Hamming distances. With
inpainting, a last section shows the input image, its autoencoder reconstruction and the
mask, then each prompt's inpaintings per setting with the fraction of known bits kept.
Under the metrics table: what each metric was measured on (the classifier's own accuracy
on held-out real images, the seen prompts of the caption recall, the bit-rate thresholds)
and what this run reused from earlier runs or computed (reference statistics, neighbours).
"""

from __future__ import annotations

import html
from pathlib import Path

from bld_t2i.config import LogConfig
from bld_t2i.tracking import start_wandb

SETTING_COLUMNS = [("diversity", "diversity", "{:.3f}"), ("clip_score", "CLIP score", "{:.2f}"),
                   ("fid", "FID", "{:.2f}"), ("kid", "KID", "{:.4f}"), ("class_accuracy", "class accuracy", "{:.3f}"),
                   ("recall_at_1", "recall@1", "{:.3f}"), ("recall_at_10", "recall@10", "{:.3f}"),
                   ("bit_rate_diff_mean", "bit rate |diff| mean", "{:.4f}"),
                   ("bit_rate_diff_max", "bit rate |diff| max", "{:.4f}"),
                   ("dead_or_saturated", "dead/saturated channels", "{:.3f}"),
                   ("data_dead_or_saturated", "data: dead/saturated", "{:.3f}"),
                   ("generation_s_per_sample", "gen s/sample", "{:.4f}"),
                   ("decode_s_per_sample", "decode s/sample", "{:.4f}")]

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.prompt { margin: 1em 0 2em; }
.settings { display: flex; flex-wrap: wrap; gap: 1em; }
.setting img { height: 96px; image-rendering: pixelated; }
.setting figcaption { font-size: 0.8em; color: #555; }
.nn { display: flex; gap: 0.3em; align-items: flex-end; margin: 0.3em 0; }
.nn figure { margin: 0; text-align: center; font-size: 0.7em; }
.nn .sample { border: 2px solid #36c; }
img.thumb { width: 64px; height: 64px; image-rendering: pixelated; }
.skipped { color: #a50; }
"""


def _e(value) -> str:
    """Every value the page shows goes through here: captions, keys, prompts and the configs of
    the folders read (a classifier's, a model's) are untrusted text."""
    return html.escape(str(value), quote=True)


def _fmt(value, pattern: str = "{}") -> str:
    """A number by `pattern`; anything else (a hostile config's string where a number belongs)
    escaped as text."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _e(pattern.format(value))
    return _e(value)


def _metrics_table(report: dict) -> str:
    head = "".join(f"<th>{_e(label)}</th>" for _, label, _ in SETTING_COLUMNS)
    lines = [f"<table id='metrics'><tr><th>setting</th><th>steps</th><th>w</th><th>guided t/T</th><th>tau</th>"
             f"<th>images</th>{head}</tr>"]
    for s in report["settings"]:
        cells = "".join(f"<td>{_fmt(s.get(key), pattern)}</td>" for key, _, pattern in SETTING_COLUMNS)
        lo, hi = s["guidance_interval"]
        interval = f"{_fmt(lo, '{:g}')}-{_fmt(hi, '{:g}')}" if s["guidance"] else ""  # w = 0 guides nowhere
        lines.append(f"<tr><td>{_e(s['setting'])}</td><td>{_fmt(s['steps'])}</td><td>{_fmt(s['guidance'], '{:g}')}</td>"
                     f"<td>{interval}</td><td>{_fmt(s['temperature'], '{:g}')}</td><td>{_fmt(s['images'])}</td>"
                     f"{cells}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _metric_notes(report: dict) -> str:
    notes = []
    if "classifier" in report:
        c = report["classifier"]
        notes.append(f"class accuracy: the fraction of samples that the classifier {_e(c['path'])} labels with their "
                     f"prompt's class; the same classifier on {_fmt(c.get('images', '?'))} held-out real images "
                     f"({_e(c.get('shards', ''))}): <b>{_fmt(c.get('accuracy', float('nan')), '{:.3f}')}</b>"
                     + (f", on their autoencoder reconstructions: "
                        f"<b>{_fmt(c['reconstructed_accuracy'], '{:.3f}')}</b>" if "reconstructed_accuracy" in c else ""))
    seen = next((s["seen_prompts"] for s in report["settings"] if "seen_prompts" in s), None)
    if seen is not None:
        notes.append(f"recall@k: the fraction of the samples of the {_fmt(seen)} seen prompts (caption, or class label, "
                     "in the training set) whose k nearest training latents (Hamming) include one of that caption")
    if any("bit_rate_diff_mean" in s for s in report["settings"]):
        notes.append("bit rate: the fraction of ones per latent channel, samples against the training latents; "
                     "dead/saturated: channels with a rate below 0.01 or above 0.99")
    return "<ul class='notes'>" + "".join(f"<li>{n}</li>" for n in notes) + "</ul>" if notes else ""


def _reuse_list(report: dict) -> str:
    items = [r["text"] for r in report.get("reuse", {}).values()]
    return "<ul id='reuse'>" + "".join(f"<li>{_e(t)}</li>" for t in items) + "</ul>" if items else ""


def _timing_table(report: dict) -> str:
    lines = ["<table id='timing'><tr><th>steps</th><th>generation s/sample</th><th>decode s/sample</th>"
             "<th>samples timed</th></tr>"]
    for steps, t in sorted(report["timing_by_steps"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"<tr><td>{_e(steps)}</td><td>{_fmt(t['generation_s_per_sample'], '{:.4f}')}</td>"
                     f"<td>{_fmt(t['decode_s_per_sample'], '{:.4f}')}</td><td>{_fmt(t['samples_timed'])}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines)


NEIGHBOUR_KINDS = {"hamming": "nearest training latents (Hamming distance in bits)",
                   "clip": "nearest training samples in CLIP image space (1 - cosine)"}


def _neighbour_rows(row, settings, n_images: int, neighbours: dict) -> str:
    parts = []
    for kind, per_setting in neighbours.items():
        for s in settings:
            found = per_setting.get(s.name, {}).get(row.id)
            if not found:
                continue
            parts.append(f"<h4>{_e(NEIGHBOUR_KINDS[kind])}, {_e(s.name)}</h4>")
            for i in range(n_images):
                figs = [f"<figure class='sample'><img class='thumb' src='images/{_e(s.name)}/{_e(row.id)}/{i:03d}.png' "
                        f"alt='sample {i}'><figcaption>sample {i}</figcaption></figure>"]
                for n in found[i]:
                    figs.append(f"<figure><img class='thumb' src='{_e(n['image'])}' alt='{_e(n['key'])}' "
                                f"title='{_e(n['caption'])}'><figcaption>{_fmt(n['distance'])}<br>{_e(n['key'])}"
                                "</figcaption></figure>")
                parts.append(f"<div class='nn'>{''.join(figs)}</div>")
    return "\n".join(parts)


def _inpainting_section(inpainting: dict, rows, settings) -> str:
    per_setting = inpainting["settings"]
    inputs = "".join(f"<figure class='setting'><img src='inpaint/{name}.png' alt='{label}'>"
                     f"<figcaption>{label}</figcaption></figure>"
                     for name, label in (("input", "original"), ("reconstruction", "autoencoder reconstruction"),
                                         ("mask", "mask (white = regenerate)")))
    body = ["<h2 id='inpainting'>Inpainting</h2>",
            f"<p>image {_e(inpainting['image'])}, mask {_e(inpainting['mask'])}: {_fmt(inpainting['kept_cells'])} of "
            f"{_fmt(inpainting['cells'])} latent cells kept; every sample uses the seed of the same sample above</p>",
            f"<div class='settings'>{inputs}</div>"]
    for row in rows:
        cells = "".join(f"<figure class='setting'><img src='inpaint/grids/{_e(s.name)}/{_e(row.id)}.png' "
                        f"alt='{_e(row.prompt)} {_e(s.name)} inpainted'><figcaption>{_e(s.name)} known bits kept "
                        f"{_fmt(per_setting[s.name]['known_bits_kept'], '{:.3f}')}</figcaption></figure>" for s in settings)
        body.append(f"<div class='prompt'><h3>{_e(row.prompt)} <small>({_e(row.id)})</small></h3>"
                    f"<div class='settings'>{cells}</div></div>")
    return "\n".join(body)


def render_report(report: dict, rows, settings, n_images: int, neighbours: dict) -> str:
    """The report page as a string (written by the caller as out/index.html)."""
    prompts = {p["id"]: p for p in report["prompts"]}
    skipped = "".join(f"<li class='skipped'>{_e(k)}: skipped ({_e(v)})</li>" for k, v in report["skipped"].items())
    body = [f"<h1>Evaluation of {_e(report['model'])}</h1>",
            f"<p>sheet {_e(report['sheet'])}; {len(rows)} prompts x {n_images} images; seed {_fmt(report['seed'])}; "
            f"{_fmt(report['latent_bits'])} latent bits; conditioning {_e(report['conditioning'])}</p>",
            "<h2>Metrics</h2>", _metrics_table(report), _metric_notes(report),
            f"<ul>{skipped}</ul>" if skipped else "", "<h2>Reused and computed</h2>" if report.get("reuse") else "",
            _reuse_list(report),
            "<h2>Timing (seconds per sample)</h2>", _timing_table(report)]
    categories: dict[str, list] = {}
    for row in rows:
        categories.setdefault(row.category, []).append(row)
    for category, members in categories.items():
        body.append(f"<h2 class='category'>{_e(category)}</h2>")
        for row in members:
            p = prompts[row.id]
            cells = []
            for s in settings:
                stats = []
                if s.name in p["diversity"]:
                    stats.append(f"diversity {_fmt(p['diversity'][s.name], '{:.3f}')}")
                if s.name in p["clip_score"]:
                    stats.append(f"CLIP {_fmt(p['clip_score'][s.name], '{:.2f}')}")
                if s.name in p.get("class_accuracy", {}):
                    stats.append(f"class accuracy {_fmt(p['class_accuracy'][s.name], '{:.2f}')}")
                cells.append(f"<figure class='setting'><img src='grids/{_e(s.name)}/{_e(row.id)}.png' "
                             f"alt='{_e(row.prompt)} {_e(s.name)}'><figcaption>{_e(s.name)} "
                             f"{', '.join(stats)}</figcaption></figure>")
            body.append(f"<div class='prompt' id='p-{_e(row.id)}'><h3>{_e(row.prompt)} "
                        f"<small>({_e(row.id)})</small></h3><div class='settings'>{''.join(cells)}</div>"
                        f"{_neighbour_rows(row, settings, n_images, neighbours)}</div>")
    if "inpainting" in report:
        body.append(_inpainting_section(report["inpainting"], rows, settings))
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>BLD evaluation</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def log_wandb(out: Path, report: dict, grids: list[Path], log_cfg: LogConfig, training_run: str) -> None:
    """The metrics table and the grids to wandb, in the group of the training run that made the
    model (its run.name), through the one wandb start-up (tracking.start_wandb)."""
    import wandb

    run = start_wandb(log_cfg, f"{training_run}-eval", None, out, {k: report[k] for k in ("model", "sheet", "seed")},
                      group=training_run, job_type="evaluate")
    if run is None:  # mode disabled
        return
    columns = list(dict.fromkeys(k for s in report["settings"] for k in s))
    table = wandb.Table(columns=columns, data=[[s.get(c) for c in columns] for s in report["settings"]])
    run.log({"metrics": table, **{f"grids/{g.parent.name}/{g.stem}": wandb.Image(str(g)) for g in grids}})
    for s in report["settings"]:  # every number also as a summary value, metric/{setting}
        run.summary.update({f"{k}/{s['setting']}": v for k, v in s.items() if isinstance(v, (int, float))
                            and not isinstance(v, bool) and k not in ("steps", "guidance", "temperature", "images")})
    if "classifier" in report:
        run.summary["classifier_heldout_accuracy"] = report["classifier"].get("accuracy")
    run.summary["reuse"] = {k: r["text"] for k, r in report.get("reuse", {}).items()}
    run.finish()
