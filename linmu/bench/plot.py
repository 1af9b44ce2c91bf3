"""The picture of a `linmu bench` result: TTFT against context length (teacher, LinMU, floor) and decode tokens/s
(batch 1 and the largest batch that fits), both on log-log axes. Needs matplotlib (the ``demo`` extra)."""

from __future__ import annotations


def plot_result(result: dict, path) -> str:
    """Write the PNG to ``path`` and return it. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    c = result["config"]
    x = [r["tokens"] for r in rows]
    has_decode = bool(rows) and "decode" in rows[0]["teacher"]
    fig, axes = plt.subplots(1, 2 if has_decode else 1, figsize=(12 if has_decode else 6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    styles = {"teacher": ("tab:red", "o"), "student": ("tab:blue", "s"), "floor": ("tab:gray", "^")}
    labels = {"teacher": "teacher (SDPA flash)", "student": "LinMU (M-MATE)", "floor": "floor (attention skipped)"}
    for name in ("teacher", "student", "floor"):
        color, marker = styles[name]
        ax.plot(x, [r[name]["ttft_ms"] / 1e3 for r in rows], marker=marker, color=color, label=labels[name])
    if c["mode"] == "frames" and all(r.get("vision_ms") is not None for r in rows):
        ax.plot(x, [r["vision_ms"] / 1e3 for r in rows], linestyle=":", color="tab:green", label="vision tower")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("time to first token (s)")
    ax.set_title("TTFT (batch 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if has_decode:
        ax = axes[0][1]
        for name in ("teacher", "student"):
            color, marker = styles[name]
            ax.plot(x, [r[name]["decode"]["best"]["tok_s"] for r in rows], marker=marker, color=color,
                    label=f"{labels[name]}, largest batch")
            ax.plot(x, [r[name]["decode"]["batch1"]["tok_s"] for r in rows], marker=marker, color=color,
                    linestyle="--", alpha=0.6, label=f"{labels[name]}, batch 1")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_ylabel("decode tokens/s")
        graphs = "CUDA graphs on both" if c["cuda_graphs"] else "no CUDA graphs"
        ax.set_title(f"decode throughput ({graphs})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{c['source']} - {c['device_name']}, {c['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
