"""What raylens shows people: the one markdown table renderer every table goes through, the
sweep report in the seed runs' columns (md, csv or json), and the Pareto-front plots (PNG and a
self-contained HTML page). Pure: rows in, text or files out; MLflow is read by ``tracking``."""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path

REPORT_FORMATS = ("md", "csv", "json")


def markdown_table(head: list[str], rows: list[list]) -> str:
    """A markdown table of ``rows`` (cells already text) under ``head``; a ``|`` inside a cell
    is written ``/`` so it cannot open a column."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

    return "\n".join([line(head), "|" + "---|" * len(head), *map(line, rows)])


# --- plots ------------------------------------------------------------------------------------

def _plot_frame(parent: dict) -> dict:
    tags, metrics = parent["tags"], parent["metrics"]
    forget, retain = tags.get("forget_task", "wmdp"), tags.get("retain_task", "mmlu")
    floor = float(parent["params"].get("retain_floor", 0) or 0)
    objectives = (tags.get("objectives") or "forget_acc,retain_acc").split(",")
    return {"forget": forget, "retain": retain, "floor": floor, "suite": tags.get("attack_suite"),
            "x": objectives[0] if objectives[0] != "retain_acc" else "forget_acc",
            "baseline": (metrics.get(f"baseline/{forget}"), metrics.get(f"baseline/{retain}")),
            "chance": (metrics.get(f"chance/{forget}"), metrics.get(f"chance/{retain}"))}


def binomial_se(acc: float | None, row: dict, task: str) -> float:
    """``sqrt(p (1 - p) / n)`` of an accuracy ``p`` over the ``n`` questions the row scored
    ``task`` on (its ``eval/<task>/n`` metric); 0 when unknown."""
    n = (row.get("metrics") or {}).get(f"eval/{task}/n")
    if acc is None or not n:
        return 0.0
    return math.sqrt(acc * (1 - acc) / n)


def plot_front_png(rows: list[dict], parent: dict, path: Path) -> None:
    """Every finished trial in the (forget accuracy, retain accuracy) plane: the front joined
    by a step line, infeasible trials crossed, the unmodified model and chance marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = _plot_frame(parent)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    x = frame["x"]
    scored = [r for r in rows if r.get(x) is not None and r["retain_acc"] is not None]
    other = [r for r in scored if r["feasible"] and not r["pareto"]]
    bad = [r for r in scored if not r["feasible"]]
    front = sorted((r for r in scored if r["pareto"]), key=lambda r: r[x])
    if scored:  # each point's binomial standard error: a front point is not a noise winner
        ax.errorbar([r[x] for r in scored], [r["retain_acc"] for r in scored],
                    xerr=[binomial_se(r[x], r, frame["forget"]) for r in scored],
                    yerr=[binomial_se(r["retain_acc"], r, frame["retain"]) for r in scored],
                    fmt="none", ecolor="#95a5a6", elinewidth=0.8, alpha=0.7, zorder=1)
    ax.scatter([r[x] for r in other], [r["retain_acc"] for r in other], c="#7a8ca3",
               label="trial")
    ax.scatter([r[x] for r in bad], [r["retain_acc"] for r in bad], c="#c0392b", marker="x",
               label="infeasible (collapsed / diverged)")
    if front:
        ax.step([r[x] for r in front], [r["retain_acc"] for r in front], where="post",
                c="#1f77b4", alpha=0.6)
        ax.scatter([r[x] for r in front], [r["retain_acc"] for r in front], c="#1f77b4", s=60,
                   edgecolors="black", label="Pareto front", zorder=3)
        for r in front:
            ax.annotate(r["trial_id"], (r[x], r["retain_acc"]), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
    base_x, base_y = frame["baseline"]
    if base_x is not None and base_y is not None:
        ax.scatter([base_x], [base_y], marker="*", s=220, c="#f1c40f", edgecolors="black",
                   label="unmodified model", zorder=4)
    chance_x, chance_y = frame["chance"]
    if chance_x is not None:
        ax.axvline(chance_x, ls=":", c="gray", label="chance")
    if chance_y is not None:
        ax.axhline(chance_y, ls=":", c="gray")
    if frame["floor"] > 0:
        ax.axhline(frame["floor"], ls="--", c="#c0392b", lw=0.8, label="retain floor")
    after = f" after the {frame['suite']} attacks" if x == "attack_acc" else ""
    ax.set_xlabel(f"{frame['forget']} accuracy{after} (lower is better); bars: ±1 binomial SE")
    ax.set_ylabel(f"{frame['retain']} accuracy (higher is better)")
    ax.set_title(f"{parent['tags'].get('sweep', '')}: {len(front)} on the front, "
                 f"{len(scored)} scored trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_front_html(rows: list[dict], parent: dict) -> str:
    """A self-contained page (inline SVG, no scripts to fetch: clusters are often offline): the
    same plot as the PNG, every point with a tooltip of its settings and a link to its run, and
    the front as a table."""
    frame = _plot_frame(parent)
    exp = parent.get("experiment_id", "")
    width, height, pad = 720, 480, 60
    sx = lambda v: pad + v * (width - 2 * pad)
    sy = lambda v: height - pad - v * (height - 2 * pad)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'font-family="sans-serif" font-size="11">',
             f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" '
             'fill="none" stroke="#999"/>']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{sx(tick):.1f}" y="{height - pad + 16}" text-anchor="middle">'
                     f'{tick:g}</text><text x="{pad - 8}" y="{sy(tick) + 4:.1f}" '
                     f'text-anchor="end">{tick:g}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle">'
                 f'{html.escape(frame["forget"])} accuracy (lower is better)</text>')
    parts.append(f'<text x="15" y="{height / 2}" transform="rotate(-90 15 {height / 2})" '
                 f'text-anchor="middle">{html.escape(frame["retain"])} accuracy '
                 '(higher is better)</text>')
    chance_x, chance_y = frame["chance"]
    if chance_x is not None:
        parts.append(f'<line x1="{sx(chance_x):.1f}" y1="{sy(0)}" x2="{sx(chance_x):.1f}" '
                     f'y2="{sy(1)}" stroke="gray" stroke-dasharray="2,3"><title>chance '
                     f'{chance_x:.3f}</title></line>')
    if chance_y is not None:
        parts.append(f'<line x1="{sx(0)}" y1="{sy(chance_y):.1f}" x2="{sx(1)}" '
                     f'y2="{sy(chance_y):.1f}" stroke="gray" stroke-dasharray="2,3"><title>'
                     f'chance {chance_y:.3f}</title></line>')
    if frame["floor"] > 0:
        parts.append(f'<line x1="{sx(0)}" y1="{sy(frame["floor"]):.1f}" x2="{sx(1)}" '
                     f'y2="{sy(frame["floor"]):.1f}" stroke="#c0392b" stroke-dasharray="6,4">'
                     f'<title>retain floor {frame["floor"]:g}</title></line>')
    scored = [r for r in rows if r["forget_acc"] is not None]
    front = sorted((r for r in scored if r["pareto"]), key=lambda r: r["forget_acc"])
    if front:
        points = []
        for a, b in zip(front, front[1:] + [None]):
            points.append(f"{sx(a['forget_acc']):.1f},{sy(a['retain_acc']):.1f}")
            if b is not None:
                points.append(f"{sx(b['forget_acc']):.1f},{sy(a['retain_acc']):.1f}")
        parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="#1f77b4" '
                     'stroke-opacity="0.6"/>')
    space = [k[len("space."):] for k in parent["params"] if k.startswith("space.")]
    for r in scored:
        settings = ", ".join(f"{k}={r['params'].get(k)}" for k in space)
        tip = html.escape(f"{r['trial_id']}: {frame['forget']} {r['forget_acc']:.4f}, "
                          f"{frame['retain']} {r['retain_acc']:.4f}, {r['status']}"
                          f"{', Pareto' if r['pareto'] else ''}; {settings}")
        x, y = sx(r["forget_acc"]), sy(r["retain_acc"])
        if not r["feasible"]:
            shape = (f'<path d="M{x - 5:.1f},{y - 5:.1f}L{x + 5:.1f},{y + 5:.1f}M{x - 5:.1f},'
                     f'{y + 5:.1f}L{x + 5:.1f},{y - 5:.1f}" stroke="#c0392b" stroke-width="2"/>')
        else:
            color = "#1f77b4" if r["pareto"] else "#7a8ca3"
            size = 7 if r["pareto"] else 5
            shape = (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{size}" fill="{color}" '
                     f'stroke="black" stroke-width="{1 if r["pareto"] else 0}"/>')
        parts.append(f'<a href="/#/experiments/{exp}/runs/{r["run_id"]}" target="_top">'
                     f'<g><title>{tip}</title>{shape}</g></a>')
    base_x, base_y = frame["baseline"]
    if base_x is not None and base_y is not None:
        parts.append(f'<g><title>unmodified model: {base_x:.4f}, {base_y:.4f}</title><text '
                     f'x="{sx(base_x):.1f}" y="{sy(base_y) + 7:.1f}" text-anchor="middle" '
                     'font-size="22" fill="#f1c40f" stroke="black">&#9733;</text></g>')
    parts.append("</svg>")
    table = ["<table><tr><th>rank</th><th>trial</th><th>"
             f"{html.escape(frame['forget'])}</th><th>{html.escape(frame['retain'])}</th>"
             + "".join(f"<th>{html.escape(k)}</th>" for k in space) + "</tr>"]
    for r in front:
        table.append(f"<tr><td>{r['pareto_rank']}</td><td>{html.escape(r['trial_id'])}</td>"
                     f"<td>{r['forget_acc']:.4f}</td><td>{r['retain_acc']:.4f}</td>"
                     + "".join(f"<td>{html.escape(_number(r['params'].get(k)))}</td>"
                               for k in space)
                     + "</tr>")
    table.append("</table>")
    title = html.escape(f"Pareto front of {parent['tags'].get('sweep', '')}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:sans-serif;margin:1em}td,th{padding:2px 8px;text-align:right}"
            "</style></head><body>"
            f"<h3>{title}</h3><p>{len(front)} of {len(scored)} scored trials on the front; "
            "hover a point for its settings, click to open its run. Star: the unmodified model; "
            "dotted: chance; dashed: the retain floor; crosses: infeasible.</p>"
            + "".join(parts) + "".join(table) + "</body></html>")


# --- the seed runs' table --------------------------------------------------------------------

def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _number(value) -> str:
    if value is None or value == "":
        return "-"
    try:
        number = float(value)
    except ValueError:
        return str(value)
    if number.is_integer():
        return str(int(number))
    return f"{number:.3g}"


def report_table(parent: dict, rows: list[dict]) -> tuple[list[str], list[dict]]:
    """The seed runs' columns (examples, epochs, steps, coefficients, learning rates, batch,
    LoRA rank, final retain and forget loss, accuracy per eval task, notes) for the baseline
    and every trial, front first; returns the header and one dict per row (raw values)."""
    tasks = json.loads(parent["params"].get("eval_tasks", "[]"))
    forget = parent["tags"].get("forget_task")
    muon = any(r["params"].get("optim.name") == "muon" for r in rows)
    lrs = ["muon_lr", "adam_lr"] if muon else ["lr"]
    attacked = any(r["metrics"].get("attack/worst") is not None for r in rows)
    after = [f"{forget} after attack (↓)"] if attacked else []
    head = ["examples", "epochs", "steps", "retain_coef", "remove_coef", *lrs, "batch",
            "LoRA rank", "retain_loss", "forget_loss",
            *[f"{t} (↓)" if t == forget else t for t in tasks], *after, "pareto", "notes"]
    baseline: dict[str, object] = {h: None for h in head}
    baseline |= {(f"{t} (↓)" if t == forget else t): parent["metrics"].get(f"baseline/{t}")
                 for t in tasks}
    baseline |= {"pareto": False, "notes": "Baseline (unmodified model)"}
    baseline |= {h: None for h in after}
    out = [baseline]
    order = sorted(rows, key=lambda r: (not r["pareto"], r["pareto_rank"] or 99,
                                        r["forget_acc"] if r["forget_acc"] is not None else 2))
    for r in order:
        p, m = r["params"], r["metrics"]
        lr_values = ({"muon_lr": p.get("optim.muon_lr"), "adam_lr": p.get("optim.adam_lr")}
                     if muon else {"lr": p.get("optim.lr")})
        notes = [r["trial_id"]]
        if r["tags"].get("hand_tuned") == "true":
            notes.append("hand-tuned base")
        if r["pareto"]:
            notes.append("Pareto front")
        elif r["pareto_rank"]:
            notes.append(f"front {r['pareto_rank']}")
        if r["status"] not in ("ok",):
            notes.append(r["status"])
        if r["tags"].get("failure_reason"):
            notes.append(r["tags"]["failure_reason"].splitlines()[0][:160])
        row = {"examples": p.get("data.num_examples"), "epochs": p.get("batch.epochs"),
               "steps": None if m.get("num_steps") is None else int(m["num_steps"]),
               "retain_coef": p.get("loss.retain_coef"),
               "remove_coef": p.get("loss.remove_coef"), **lr_values,
               "batch": p.get("batch.global_batch"),
               "LoRA rank": p.get("mode.lora_rank") if p.get("mode.kind") == "lora" else None,
               "retain_loss": m.get("train/retain_loss"),
               "forget_loss": m.get("train/forget_loss"),
               **{(f"{t} (↓)" if t == forget else t): m.get(f"eval/{t}") for t in tasks},
               **{h: m.get("attack/worst") for h in after},
               "pareto": r["pareto"], "notes": "; ".join(notes)}
        if after and r["tags"].get("attack_worst"):
            notes.append(f"worst attack {r['tags']['attack_worst']}")
            row["notes"] = "; ".join(notes)
        out.append(row)
    return head, out


def render_report(experiment: str, parent: dict, rows: list[dict], fmt: str = "md", *,
                  attacks: list[dict] | None = None) -> str:
    """The sweep's table (``report_table``) as ``md`` (the seed runs' shape, Pareto rows'
    accuracies in bold), ``csv`` or ``json``; with ``attacks`` (attacked trials, as
    ``tracking.attack_results`` reads them) the tamper table follows (md, json)."""
    head, table = report_table(parent, rows)
    if fmt == "json":
        return json.dumps({"experiment": experiment, "columns": head, "rows": table,
                           "attacks": attacks or []}, indent=1)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=head, lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        return buffer.getvalue().rstrip("\n")
    accuracy = {h for h in head if h.endswith("(↓)") or h in
                json.loads(parent["params"].get("eval_tasks", "[]"))}
    shown = [h for h in head if h != "pareto"]
    cells = []
    for row in table:
        line = []
        for h in shown:
            value = row[h]
            if h in accuracy:
                text = _percent(value)
                line.append(f"**{text}**" if row["pareto"] and value is not None else text)
            else:
                line.append(str(value) if h == "notes" else _number(value))
        cells.append(line)
    text = markdown_table(shown, cells)
    if attacks and fmt == "md":
        retain = parent["tags"].get("retain_task", "retain")
        text += "\n\n## Tamper resistance (fine-tuning attacks)\n\n" + tamper_table(
            attacks, retain, chance=parent["metrics"].get(f"chance/{retain}"))
    return text


# --- fine-tuning attacks ----------------------------------------------------------------------

def _attack_config(config: dict) -> str:
    """An attack's settings in the seed's words: "512 examples, lr=0.002, 1 epoch, full"."""
    text = (f"{_number(config.get('num_examples'))} {config.get('corpus', 'forget')} examples, "
            f"lr={_number(config.get('lr'))}, ")
    if config.get("max_steps") not in (None, "None", ""):
        text += f"{_number(config['max_steps'])} steps"
    else:
        epochs = _number(config.get("epochs"))
        text += f"{epochs} epoch{'' if epochs == '1' else 's'}"
    text += f", {config.get('mode', 'full')}, {config.get('schedule', 'linear')}"
    if config.get("dtype") not in (None, "float32"):
        text += f", {config['dtype']}"
    return text


def _at(curve: list[dict], step: int) -> dict | None:
    """The curve's point at ``step``, or the last one before it."""
    before = [p for p in curve if p["step"] <= step]
    return before[-1] if before else None


def tamper_table(attacked: list[dict], retain_task: str = "retain",
                 chance: float | None = None) -> str:
    """The seed runs' tamper table for attacked models (``{"label", "results"}`` each): attack
    config, forget accuracy at step 0, halfway and at the end, the worst (and its step), the
    recovery, the steps to the declared level, and the retain accuracy at the start and end
    beside it. A model whose retain accuracy is within 0.1 of chance is marked collapsed: it
    resists only because it knows nothing."""
    rows = []
    for model in attacked:
        for r in model["results"]:
            curve = r["curve"]
            end = curve[-1]["step"] if curve else 0
            mid = _at(curve, end // 2) if curve else None
            note = []
            if model.get("worst_attack") == r["attack"]:
                note.append("worst of the suite")
            start_retain = curve[0]["retain_acc"] if curve else None
            if chance is not None and start_retain is not None and start_retain < chance + 0.1:
                note.append(f"collapsed ({retain_task} near chance): resistance means nothing")
            level = r.get("steps_to_level")
            rows.append([
                model["label"], r["attack"], _attack_config(r["config"]),
                _percent(curve[0]["forget_acc"]) if curve else "-",
                f"{_percent(mid['forget_acc'])} ({mid['step']})" if mid else "-",
                f"{_percent(curve[-1]['forget_acc'])} ({end})" if curve else "-",
                f"{_percent(r['worst'])} ({_number(r['worst_step'])})",
                f"{100 * r['recovery']:+.2f} pp" if r.get("recovery") is not None else "-",
                "-" if level is None else _number(level),
                f"{_percent(start_retain)} → {_percent(curve[-1]['retain_acc'])}"
                if curve else "-", "; ".join(note)])
    return markdown_table(["model", "attack", "attack config", "step 0", "halfway (step)",
                           "end (step)", "worst (step)", "recovery", "steps to level",
                           f"{retain_task} start → end", "notes"], rows)


def render_attacks(experiment: str, attacked: list[dict], fmt: str = "md") -> str:
    """An experiment of ``raylens attack`` runs: the tamper table (md) or its data (json, csv:
    one row per attack)."""
    if fmt == "json":
        return json.dumps({"experiment": experiment, "attacks": attacked}, indent=1)
    if fmt == "csv":
        buffer = io.StringIO()
        fields = ["model", "attack", "start", "worst", "worst_step", "recovery",
                  "steps_to_level", "retain_end"]
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for model in attacked:
            for r in model["results"]:
                writer.writerow({"model": model["label"], **{k: r.get(k) for k in fields[1:]}})
        return buffer.getvalue().rstrip("\n")
    return tamper_table(attacked)


def plot_attack_curves(results: list[dict], tasks: list[str], path: Path) -> None:
    """Forget (solid) and retain (dashed) accuracy against attack step, one colour per
    attack, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(results):
        steps = [p["step"] for p in r["curve"]]
        colour = f"C{i % 10}"
        ax.plot(steps, [p["forget_acc"] for p in r["curve"]], "-o", color=colour, ms=3,
                label=f"{r['attack']}: {tasks[0]}")
        ax.plot(steps, [p["retain_acc"] for p in r["curve"]], "--", color=colour,
                label=f"{r['attack']}: {tasks[1]}")
    ax.set_xlabel("attack step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("fine-tuning attacks: forget (solid) and retain (dashed) accuracy")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
