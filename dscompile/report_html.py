"""A self-contained HTML report of a compile, with plots: KV rank per layer (MLA), expert load (MoE), MTP
acceptance by draft position, the before/after table, generation figures and the graph diff.

The report is built from :meth:`Report.to_dict` (or a :class:`Report`), so a JSON written by ``dscompile optimize
--json`` can be turned into HTML later. Plots are drawn with matplotlib's Agg canvas (no display, no global pyplot
state) and embedded as base64 PNG: the file opens anywhere, offline, and can be mailed as one attachment. Sections
without data say why instead of showing an empty plot.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import UnsupportedError

log = logging.getLogger("dscompile")

Row = Sequence[Any]
"""A before/after row: ``(label, before, after)`` or ``(label, before, after, format)`` (a ``str.format`` pattern,
as the CLI's table uses)."""

PLOTS = ("kv_rank", "expert_load", "mtp_acceptance")
"""The plots, by the stem of their PNG file."""

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1d1d1f; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .6em 0; } th, td { padding: .25em .8em; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f5f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f5f5f7; padding: .8em; overflow-x: auto; } img { max-width: 100%; }
p.empty { color: #666; font-style: italic; } .meta { color: #555; }
"""


def _as_dict(report: Any) -> tuple[dict[str, Any], str | None]:
    """The report's dict form, and the diff's text when a :class:`Report` (or a mapping) makes it available."""
    if isinstance(report, Mapping):
        data = dict(report)
        return data, _diff_text(data.get("diff"))
    if hasattr(report, "to_dict"):
        diff = getattr(report, "diff", None)
        return report.to_dict(), str(diff) if diff is not None else None
    raise TypeError(f"expected a Report or its to_dict() mapping, not {type(report).__name__}")


def _diff_text(diff: Any) -> str | None:
    """``str(GraphDiff)`` rebuilt from its ``to_dict()`` (what a JSON report holds)."""
    if not isinstance(diff, Mapping):
        return None
    from .diff import GraphDiff

    fields = {k: v for k, v in diff.items() if k not in ("op_changes", "unchanged")}
    try:
        return str(GraphDiff(**fields))
    except TypeError:  # a diff from another version: show its fields as they are
        return "\n".join(f"{k}: {v}" for k, v in diff.items())


def short_names(names: Sequence[str]) -> list[str]:
    """Layer names without the dotted prefix and suffix they all share (``model.layers.3.mlp`` -> ``3``), so plot
    axes stay readable; names are returned whole when that would leave one of them empty."""
    parts = [n.split(".") for n in names]
    if len(parts) < 2:
        return list(names)
    head = 0
    while all(len(p) > head + 1 for p in parts) and len({p[head] for p in parts}) == 1:
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    out = [".".join(p[head:len(p) - tail]) for p in parts]
    return out if all(out) else list(names)


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency
        raise UnsupportedError("the report's plots need matplotlib: pip install 'matplotlib>=3.8'") from exc
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # Agg: no display needed, and no pyplot global state
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _kv_rank_png(ranks: Mapping[str, int], kv_width: Mapping[str, int]) -> bytes:
    names = list(ranks)
    fig = _figure(max(5.0, min(14.0, 0.35 * len(names) + 3)), 3.4)
    ax = fig.add_subplot()
    xs = range(len(names))
    if kv_width:
        ax.bar(xs, [kv_width.get(n, 0) for n in names], color="#d0d7e1", label="original K+V width")
    ax.bar(xs, [ranks[n] for n in names], color="#3b6fb6", label="latent rank (cached)")
    labels = short_names(names)
    crowded = len(names) > 12 and max(len(s) for s in labels) > 3
    ax.set_xticks(list(xs), labels, rotation=90 if crowded else 0, fontsize=8)
    ax.set_ylim(0, 1.25 * max([*ranks.values(), *kv_width.values(), 1]))  # headroom for the legend
    ax.set_xlabel("layer")
    ax.set_ylabel("values per token")
    ax.set_title("MLA: KV rank per layer")
    ax.legend(fontsize=8, ncols=2, loc="upper center")
    return _png(fig)


def _expert_load_png(loads: Mapping[str, Sequence[float]]) -> bytes:
    import numpy as np

    names = list(loads)
    experts = max(len(v) for v in loads.values())
    grid = np.full((len(names), experts), np.nan)
    for i, n in enumerate(names):
        grid[i, :len(loads[n])] = loads[n]
    fig = _figure(max(5.0, min(14.0, 0.25 * experts + 3)), max(2.5, min(12.0, 0.28 * len(names) + 1.8)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), short_names(names), fontsize=8)
    ax.set_xlabel("routed expert")
    ax.set_ylabel("layer")
    ax.set_title("MoE: expert load (1.0 = even share)")
    fig.colorbar(image, ax=ax, label="load / mean")
    return _png(fig)


def _acceptance_png(acceptance: Sequence[float], tokens_per_step: float | None) -> bytes:
    fig = _figure(max(5.0, 0.8 * len(acceptance) + 2.5), 3.4)
    ax = fig.add_subplot()
    xs = list(range(1, len(acceptance) + 1))
    ax.bar(xs, acceptance, color="#4a9a5b")
    for x, a in zip(xs, acceptance):
        ax.annotate(f"{a:.2f}", (x, a), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs)
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("draft position")
    ax.set_ylabel("share of steps kept")
    title = "MTP: acceptance by draft position"
    if tokens_per_step is not None:
        title += f"\n{tokens_per_step:.2f} tokens per step"
    ax.set_title(title)
    return _png(fig)


def _kv_width(data: Mapping[str, Any]) -> dict[str, int]:
    """Per attention layer, the values per token a full K/V cache holds (the bar MLA's rank is measured against)."""
    out: dict[str, int] = {}
    for a in (data.get("matches") or {}).get("attention", []):
        try:
            out[a["layer"]] = int(a["n_kv_heads"]) * (int(a["head_dim"]) + int(a.get("v_head_dim") or a["head_dim"]))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _mtp(data: Mapping[str, Any], generation: Mapping[str, Any] | None) -> tuple[list[float] | None, float | None]:
    """MTP acceptance by position and tokens per step: from the report, else from a generation's stats."""
    extra = (generation or {}).get("extra") or {}
    acceptance = data.get("mtp_acceptance", extra.get("mtp_acceptance"))
    per_step = data.get("mtp_tokens_per_step", extra.get("mtp_tokens_per_step"))
    return (list(acceptance) if acceptance else None), per_step


def render_plots(report: Any, *, generation: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """The PNG bytes of every plot the report has data for, by name (see :data:`PLOTS`)."""
    data, _ = _as_dict(report)
    plots: dict[str, bytes] = {}
    if data.get("mla_ranks"):
        plots["kv_rank"] = _kv_rank_png(data["mla_ranks"], _kv_width(data))
    loads = {k: v for k, v in (data.get("moe_expert_load") or {}).items() if v}
    if loads:
        plots["expert_load"] = _expert_load_png(loads)
    acceptance, per_step = _mtp(data, generation)
    if acceptance:
        plots["mtp_acceptance"] = _acceptance_png(acceptance, per_step)
    return plots


def _write_pngs(plots: Mapping[str, bytes], png_dir: str | Path) -> list[Path]:
    folder = Path(png_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, png in plots.items():
        path = folder / f"{name}.png"
        path.write_bytes(png)
        paths.append(path)
    return paths


def save_plots(report: Any, png_dir: str | Path, *, generation: Mapping[str, Any] | None = None) -> list[Path]:
    """Write the report's plots as PNG files (``kv_rank.png``, ``expert_load.png``, ``mtp_acceptance.png``, those
    with data) into ``png_dir``, created if missing; returns their paths."""
    return _write_pngs(render_plots(report, generation=generation), png_dir)


# --- HTML -------------------------------------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, fmt: str | None = None) -> str:
    if value is None:
        return "n/a"
    if fmt:
        try:
            return fmt.format(value)
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(header)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if n else f"<td>{_e(c)}</td>" for c, n in zip(r, numeric))
        + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _empty(text: str) -> str:
    return f'<p class="empty">{_e(text)}</p>'


def _change(before: Any, after: Any) -> str:
    if isinstance(before, (int, float)) and isinstance(after, (int, float)) and before:
        return f"{(after / before - 1) * 100:+.2f}%"
    return "n/a"


def _before_after(data: Mapping[str, Any], table: Sequence[Row] | None) -> str:
    if table is None:  # what the report alone knows
        table = [("KV bytes per token", data.get("kv_bytes_per_token_before"), data.get("kv_bytes_per_token_after"),
                  "{:,}"),
                 ("parameters", data.get("params_before"), data.get("params_after"), "{:,}")]
    rows = []
    for row in table:
        label, before, after = row[0], row[1], row[2]
        fmt = row[3] if len(row) > 3 else None
        rows.append((label, _num(before, fmt), _num(after, fmt), _change(before, after)))
    return _table(("metric", "original", "optimized", "change"), rows, (False, True, True, True))


def _generation(generation: Mapping[str, Any] | None) -> str:
    if not generation:
        return _empty("No generation was run (dscompile optimize --generate 0, or no generation stats were given).")
    keys = [("batch", "batch", "{:,}"), ("prompt_tokens", "prompt tokens", "{:,}"),
            ("new_tokens", "new tokens", "{:,}"), ("time_to_first_token_s", "time to first token (s)", "{:.3f}"),
            ("decode_tokens_per_s", "decode tokens/s", "{:.1f}"), ("cache_bytes", "KV cache bytes", "{:,}"),
            ("peak_memory_bytes", "peak memory bytes", "{:,}"), ("device", "device", None)]
    rows = [(label, _num(generation[k], fmt)) for k, label, fmt in keys if k in generation]
    extra = generation.get("extra") or {}
    if "mtp_tokens_per_step" in extra:
        rows.append(("MTP tokens per step", _num(extra["mtp_tokens_per_step"], "{:.2f}")))
    if "mtp" in extra:
        rows.append(("MTP", extra["mtp"]))
    if "capacity" in extra:
        rows.append(("cache capacity (slots)", _num(extra["capacity"], "{:,}")))
    return _table(("figure", "value"), rows, (False, True))


def _mla(data: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    ranks = data.get("mla_ranks")
    if not ranks:
        return _empty("No MLA in this profile: the KV cache keeps full keys and values, so there is no rank to plot.")
    width = _kv_width(data)
    rows = [(layer, f"{rank:,}", f"{width[layer]:,}" if layer in width else "n/a") for layer, rank in ranks.items()]
    parts = [_img(plots["kv_rank"], "MLA KV rank per layer") if "kv_rank" in plots else "",
             _table(("layer", "latent rank", "original K+V width"), rows, (False, True, True))]
    if data.get("mla_calibration_tokens"):
        parts.append(f'<p class="meta">Fitted to {_e(_num(data["mla_calibration_tokens"]))} calibration tokens.</p>')
    skipped = data.get("mla_skipped") or {}
    if skipped:
        parts += ["<p>Layers left uncompressed:</p>", _table(("layer", "reason"), list(skipped.items()))]
    return "".join(parts)


def _moe(data: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    loads = data.get("moe_expert_load")
    if not loads:
        return _empty("No MoE in this profile: the feed-forward layers stay dense, so there is no expert load.")
    maxvio = data.get("moe_maxvio") or {}
    rows = [(layer, len(load), _num(max(load) if load else None, "{:.3f}"), _num(maxvio.get(layer), "{:.4f}"))
            for layer, load in loads.items()]
    parts = [_img(plots["expert_load"], "MoE expert load heatmap") if "expert_load" in plots else "",
             _table(("layer", "routed experts", "max load / mean", "MaxVio"), rows, (False, True, True, True))]
    if data.get("moe_calibration_tokens"):
        parts.append(f'<p class="meta">Load measured on {_e(_num(data["moe_calibration_tokens"]))} calibration '
                     "tokens, after the balancing bias.</p>")
    skipped = data.get("moe_skipped") or {}
    if skipped:
        parts += ["<p>Layers left dense:</p>", _table(("layer", "reason"), list(skipped.items()))]
    return "".join(parts)


def _mtp_section(data: Mapping[str, Any], generation: Mapping[str, Any] | None, plots: Mapping[str, bytes]) -> str:
    acceptance, per_step = _mtp(data, generation)
    if not acceptance:
        has_mtp = bool((data.get("profile") or {}).get("mtp"))
        return _empty("MTP is in this profile, but no generate call with speculation was made yet, so there is no "
                      "acceptance to show." if has_mtp else
                      "No MTP in this profile: generation makes one token per step.")
    rows = [(i + 1, f"{a:.3f}") for i, a in enumerate(acceptance)]
    parts = [_img(plots["mtp_acceptance"], "MTP acceptance by draft position") if "mtp_acceptance" in plots else "",
             _table(("draft position", "share of steps kept"), rows, (True, True))]
    if per_step is not None:
        parts.append(f"<p>{_e(f'{per_step:.2f}')} tokens per step (1.00 without drafts).</p>")
    return "".join(parts)


def _summary(data: Mapping[str, Any]) -> str:
    counts = (data.get("matches") or {}).get("counts") or {}
    rows = [("profile", (data.get("profile") or {}).get("name", "n/a")),
            ("graphs compiled", _num(data.get("graphs"))),
            ("compile seconds", _num(data.get("compile_seconds"), "{:.2f}")),
            ("matched attention / FFN / LM head",
             " / ".join(str(counts.get(k, 0)) for k in ("attention", "ffn", "lm_head"))),
            ("active parameters per token", _num(data.get("active_params_per_token")))]
    return _table(("item", "value"), rows, (False, True))


def _passes(data: Mapping[str, Any]) -> str:
    rows = [(p.get("name", ""), p.get("rewrites", ""), "; ".join(map(str, p.get("notes") or [])),
             "; ".join(map(str, p.get("skipped") or []))) for p in data.get("passes") or []]
    if not rows:
        return _empty("No rewriting pass ran.")
    return _table(("pass", "rewrites", "notes", "skipped"), rows, (False, True, False, False))


def render_html(report: Any, *, table: Sequence[Row] | None = None, generation: Mapping[str, Any] | None = None,
                title: str | None = None, plots: Mapping[str, bytes] | None = None) -> str:
    """The report as one HTML document (plots embedded), without writing it anywhere."""
    data, diff_text = _as_dict(report)
    if plots is None:
        plots = render_plots(data, generation=generation)
    profile = (data.get("profile") or {}).get("name", "custom")
    heading = title or f"dscompile report: profile {profile}"
    sections = [
        ("Summary", _summary(data)),
        ("Before / after", _before_after(data, table)),
        ("Generation", _generation(generation)),
        ("MLA: KV rank per layer", _mla(data, plots)),
        ("MoE: expert load", _moe(data, plots)),
        ("MTP: acceptance by draft position", _mtp_section(data, generation, plots)),
        ("Graph diff", f"<pre>{_e(diff_text)}</pre>" if diff_text else _empty("The report holds no graph diff.")),
        ("Passes", _passes(data)),
    ]
    body = "\n".join(f'<section id="{_slug(name)}"><h2>{_e(name)}</h2>\n{content}</section>'
                     for name, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(heading)}</title>'
            f"<style>{_CSS}</style></head>\n<body><h1>{_e(heading)}</h1>\n{body}\n</body></html>\n")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_html_report(report: Any, path: str | Path, *, table: Sequence[Row] | None = None,
                      generation: Mapping[str, Any] | None = None, png_dir: str | Path | None = None,
                      title: str | None = None) -> Path:
    """Write a self-contained HTML report of ``report`` (a :class:`Report` or its ``to_dict()``) to ``path``.

    ``table`` holds the before/after rows (label, original, optimized[, format]) as ``dscompile optimize`` measures
    them; without it the table shows what the report knows (KV bytes per token, parameters). ``generation`` is a
    ``GenerationStats.to_dict()`` (MTP acceptance is read from it when the report has none). With ``png_dir`` the
    plots are also written there as PNG files. Returns the path written.
    """
    plots = render_plots(report, generation=generation)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_html(report, table=table, generation=generation, title=title, plots=plots),
                      encoding="utf-8")
    if png_dir is not None:
        _write_pngs(plots, png_dir)
    log.info("report: wrote %s with %d plot(s)", target, len(plots))
    return target
