"""report.md and the PNG plots of a demo run."""

from __future__ import annotations

from pathlib import Path


def write_plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    acc = report["accuracy"]
    lengths = list(acc["teacher"])
    tasks = list(acc["teacher"][lengths[0]]["per_task"])
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        x = range(len(tasks))
        for k, (name, color) in enumerate((("teacher", "#4c72b0"), ("student", "#dd8452"))):
            ax.bar([i + 0.4 * k - 0.2 for i in x], [acc[name][n]["per_task"][t] for t in tasks], 0.4,
                   label=name, color=color)
        ax.plot([i for i in x], [report["chance"][t] for t in tasks], "k_", markersize=20, label="chance")
        ax.set_xticks(list(x), tasks, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"accuracy per task, {n} frames")
        ax.legend()
    fig.tight_layout()
    paths.append(out / "accuracy_per_task.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    rows = report["speed"]
    frames = [r["frames"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in (("teacher", "#4c72b0"), ("student", "#dd8452")):
        axes[0].plot(frames, [r[name]["ttft_s"] * 1e3 for r in rows], "o-", color=color, label=name)
        axes[1].plot(frames, [r[name]["cache_bytes"] / 1024 for r in rows], "o-", color=color, label=name)
    axes[0].set(xlabel="clip length (frames)", ylabel="time to first token (ms)", title="prefill time")
    axes[1].set(xlabel="clip length (frames)", ylabel="cache after prefill (KiB)", title="inference memory")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "prefill_time_and_memory.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def write_markdown(report: dict, out: Path) -> Path:
    acc = report["accuracy"]
    lengths = list(acc["teacher"])
    tasks = list(acc["teacher"][lengths[0]]["per_task"])
    lines = [f"# linmu demo report ({'quick' if report['quick'] else 'full'}, ablation: {report['ablation']})", "",
             f"Teacher trained at {report['train_frames']} frames; tested at {lengths[0]} and {lengths[-1]} frames "
             f"({report['settings']['n_test']} test clips each). Total time {report['seconds'] / 60:.1f} min.", "",
             "## Accuracy", "", "| task | chance | " + " | ".join(
                 f"teacher {n} | student {n}" for n in lengths) + " |",
             "|---|---:|" + "---:|---:|" * len(lengths)]
    for t in tasks + ["overall"]:
        cells = []
        for n in lengths:
            for name in ("teacher", "student"):
                a = acc[name][n]["accuracy"] if t == "overall" else acc[name][n]["per_task"][t]
                cells.append(f"{a:.3f}")
        chance = "" if t == "overall" else f"{report['chance'][t]:.3f}"
        lines.append(f"| {t} | {chance} | " + " | ".join(cells) + " |")
    lines += ["", "## Distillation stages", "", "| stage | steps | seconds | first loss | last loss |",
              "|---:|---:|---:|---:|---:|"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['steps']} | {s['seconds']:.0f} | {s['first_loss']:.4g} | "
                     f"{s['last_loss']:.4g} |")
    lines += ["", "## Speed (CPU, same inputs, same run)", "",
              "| frames | tokens | TTFT teacher ms | TTFT student ms | TTFT ratio | decode teacher tok/s | "
              "decode student tok/s | decode ratio | cache teacher KiB | cache student KiB |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["speed"]:
        lines.append(f"| {r['frames']} | {r['tokens']} | {r['teacher']['ttft_s'] * 1e3:.0f} | "
                     f"{r['student']['ttft_s'] * 1e3:.0f} | {r['ttft_ratio']:.2f} | "
                     f"{r['teacher']['decode_tok_s']:.0f} | {r['student']['decode_tok_s']:.0f} | "
                     f"{r['decode_ratio']:.2f} | {r['teacher']['cache_bytes'] / 1024:.0f} | "
                     f"{r['student']['cache_bytes'] / 1024:.0f} |")
    lines += ["", "![accuracy](accuracy_per_task.png)", "", "![speed](prefill_time_and_memory.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
