"""The benchmark's Markdown table, chart and files."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from .projections import (
    GLOBAL_BATCH,
    PROJECTION_SIZE,
    SAMPLING_STEPS,
    SAMPLING_VARIANTS,
    SAMPLING_VOLUMES,
    STAGES,
    ratio_to_reference,
)
from .setups import GRAD_CLIP, REFERENCE


def fmt_value(value: Any, fmt: str = "{:.3g}", none: str = "–") -> str:
    """A table cell: numbers through ``fmt``, None as ``none``, anything else as text."""
    if value is None:
        return none
    if isinstance(value, (int, float)):
        return fmt.format(value)
    return str(value)


def fmt_ratio(value: float | None) -> str:
    """A speed-up cell: "2.34x", or "–" when there is none."""
    return "–" if value is None else f"{value:.2f}x"


def title(result: dict[str, Any]) -> str:
    dev = result["device"]["name"]
    if result["device_type"] == "cpu":
        return f"PRDiT benchmark: CPU results ({dev}), not GPU figures"
    return f"PRDiT benchmark: {dev} (GPU)"


def to_markdown(result: dict[str, Any]) -> str:
    env, peaks = result, result["peaks"]
    cpu = result["device_type"] == "cpu"
    lines = [f"# {title(result)}", ""]
    if cpu:
        lines += ["> **CPU results.** These numbers were measured on a CPU and say nothing about GPU "
                  "throughput, and no GPU-hours are projected from them.", ""]
    v = env["versions"]
    lines += [
        f"- device: {env['device']['name']} ({result['device_type']}), driver {v.get('driver') or 'n/a'}, "
        f"CUDA {v.get('cuda') or 'n/a'}, torch {v['torch']}, Triton {v.get('triton') or 'n/a'}",
        f"- commit {env['git_commit']}{' (uncommitted changes)' if env.get('git_dirty') else ''}, "
        f"date {env['date']}",
        f"- command: `{env['command']}`",
        f"- sampler: predictor-corrector k=2; a step is one model call plus the update, timed over "
        f"{result['settings']['steps_per_rep']} steps per rep (median of reps after warm-up); "
        f"volumes/hour at {SAMPLING_STEPS} steps",
        f"- training step: IaN losses, backward, grad clip {GRAD_CLIP}, AdamW; depth > 0 trains the "
        f"fine path only",
        f"- bf16 matmul peak {fmt_value(peaks.get('matmul', {}).get('tflops'), '{:.3g}')} TFLOP/s "
        f"({'x'.join(map(str, peaks.get('matmul', {}).get('shape', [])))}), copy bandwidth "
        f"{fmt_value(peaks.get('copy', {}).get('gbps'), '{:.0f}')} GB/s (read + write); MFU is against the bf16 "
        f"peak for every backend, fp32 ones included",
        f"- ratios (`x ref`) are against `{REFERENCE}` at the same variant, edge and batch; "
        f"memory ratios are backend / reference",
        "",
        "## Sampling and training",
        "",
        "| variant | S | backend | batch | step ms | x ref | volumes/h | sample peak GiB | x ref mem | "
        "sample MFU | train samples/s | x ref | train peak GiB | x ref mem | train MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        samp_ok, train_ok = r["sample_status"] == "ok", r["train_status"] == "ok"
        lines.append(
            f"| {r['variant']} | {r['size']} | {r['backend']} | {r['batch']} | "
            + (f"{r['sample_step_ms']:.3g} | {fmt_ratio(r.get('sample_speedup'))} | {fmt_value(r.get('volumes_per_hour'))} | "
               f"{fmt_value(r.get('sample_peak_memory_gib'), '{:.2f}', 'n/a')} | {fmt_ratio(r.get('sample_memory_ratio'))} | "
               f"{fmt_value(r.get('sample_mfu'), '{:.1%}')} | "
               if samp_ok else f"{r['sample_status']} | | | | | | ")
            + (f"{r['train_samples_per_s']:.3g} | {fmt_ratio(r.get('train_speedup'))} | "
               f"{fmt_value(r.get('train_peak_memory_gib'), '{:.2f}', 'n/a')} | {fmt_ratio(r.get('train_memory_ratio'))} | "
               f"{fmt_value(r.get('train_mfu'), '{:.1%}')} |"
               if train_ok else f"{r['train_status']} | | | | |")
        )
    skipped = [b for b in result["backends"] if b["status"] != "run"]
    if skipped:
        lines += ["", "## Backends not run", ""] + [f"- `{b['name']}`: {b['reason']}" for b in skipped]

    if not result["projections"]:
        lines += ["", "## GPU-hour projections", "",
                  "None: " + ("a CPU run projects no GPU-hours." if cpu else
                              f"projections come only from throughput measured at {PROJECTION_SIZE}^3."), ""]
    else:
        lines += ["", "## GPU-hour projections", "",
                  f"Training: the paper's recipe at global batch {GLOBAL_BATCH}, GPU-hours = steps x "
                  f"{GLOBAL_BATCH} / samples per s / 3600 ({', '.join(f'{l}: {v} {s // 1000}k steps' for l, v, s in STAGES)}), "
                  f"from the throughput measured at {PROJECTION_SIZE}^3. Sampling: "
                  f"{SAMPLING_VOLUMES:,} volumes at {SAMPLING_STEPS} steps. `x ref` = reference hours / backend hours.",
                  "",
                  "| backend | train S | stage 1 GPUh | stage 2 GPUh | total GPUh | x ref | "
                  + " | ".join(f"sample {v.split('-')[1]} GPUh (S) | x ref" for v in SAMPLING_VARIANTS) + " |",
                  "| --- " * (6 + 2 * len(SAMPLING_VARIANTS)) + "|"]
        for p in result["projections"]:
            cells = [p["backend"], fmt_value(p.get("training_size")),
                     fmt_value(p.get("stage 1", {}).get("gpu_hours"), "{:.4g}"), fmt_value(p.get("stage 2", {}).get("gpu_hours"), "{:.4g}"),
                     fmt_value(p.get("training_gpu_hours"), "{:.4g}"), fmt_ratio(p.get("training_speedup"))]
            for variant in SAMPLING_VARIANTS:
                s = p["sampling_1000_volumes"].get(variant)
                cells += [f"{s['gpu_hours']:.4g} ({s['size']})", fmt_ratio(s.get("speedup"))] if s else ["–", "–"]
            lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Largest sampling batch that fits in memory", ""]
    if result["capacity"]:
        lines += [f"Variant {result['settings']['capacity_variant']}; one sampling step (model call + update); "
                  f"doubling then bisection, bounded in time per backend and edge.", "",
                  "| backend | S | max batch | x ref | bounded by | status | s |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        ref = {c["size"]: c.get("max_batch") for c in result["capacity"] if c["backend"] == REFERENCE}
        for c in result["capacity"]:
            lines.append(f"| {c['backend']} | {c['size']} | {c.get('max_batch', 0)} | "
                         f"{fmt_ratio(ratio_to_reference(c.get('max_batch'), ref.get(c['size']), True))} | {c.get('bounded_by') or '–'} | "
                         f"{c.get('status')} | {c.get('seconds')} |")
        lines += [""] + [f"- `{b}`: largest edge {s['size']}^3 with batch {s['max_batch']}"
                         + (f" or more (search bounded by {s['bounded_by']})" if s.get("bounded_by") else "")
                         for b, s in result["capacity_summary"].items()]
    else:
        lines.append(f"Not measured: {result.get('capacity_note', 'disabled')}.")
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any]) -> bytes:
    """PNG: per cell, sampling step latency (log scale) and sampling speedup vs the reference."""
    import matplotlib  # optional dependency (the bench extra), needed only for the chart

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("sample_step_ms")]
    cells = list(dict.fromkeys((r["variant"], r["size"], r["batch"]) for r in result["rows"]))
    backends = [b["name"] for b in result["backends"] if b["status"] == "run"]
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.6 * len(cells) + 5), 4.8))
    width = 0.8 / max(1, len(backends))
    for i, name in enumerate(backends):
        for ax, key in zip(axes, ("sample_step_ms", "sample_speedup")):
            xs, ys = [], []
            for j, cell in enumerate(cells):
                r = next((r for r in rows if (r["variant"], r["size"], r["batch"]) == cell and r["backend"] == name), None)
                if r is not None and r.get(key):
                    xs.append(j + (i - (len(backends) - 1) / 2) * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width, label=name)
            for j, cell in enumerate(cells):
                r = next((r for r in result["rows"] if (r["variant"], r["size"], r["batch"]) == cell
                          and r["backend"] == name), None)
                if r is not None and r["sample_status"] == "OOM":
                    ax.annotate("OOM", (j + (i - (len(backends) - 1) / 2) * width, 0), xycoords=("data", "axes fraction"),
                                ha="center", va="bottom", fontsize=7, rotation=90)
    labels = [f"{v.replace('PRDiT-', '')}\n{s}^3 b{b}" for v, s, b in cells]
    for ax, ylabel in zip(axes, ("sampling step latency (ms, log)", f"speedup vs {REFERENCE} (x)")):
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(ylabel)
    axes[0].set_yscale("log")
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(title(result), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_results(result: dict[str, Any], folder: Path, stem: str = "bench", chart: bool = True) -> dict[str, Path]:
    """<stem>.json, <stem>.md and (``chart``) <stem>.png under ``folder``, each written atomically."""
    paths = {"json": folder / f"{stem}.json", "markdown": folder / f"{stem}.md", "png": folder / f"{stem}.png"}
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(to_markdown(result))
    if chart:
        with atomic_path(paths["png"]) as tmp:
            tmp.write_bytes(plot(result))
    return paths
