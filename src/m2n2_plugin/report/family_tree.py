"""The best model's family tree back to the seeds: ``plots/lineage.png`` and the dashboard's copy.

``lineage.yml`` says how to rebuild a model; this says where it came from at a glance, which
is the first thing people ask of an evolutionary merge. Each node is a trial (its number and
mean fitness score, coloured by that score); each child's two incoming edges (solid from
parent A, the base; dashed from parent B) meet at a label with the merge's mix ratio ``w`` and
split point ``s``. Nodes are laid out in layers by generation (a seed is generation 0, a
child one more than its younger parent), ordered within a layer to keep edges short, so a
tree of ~50 merges stays readable. matplotlib only: no graphviz binary to install.

The tree is a DAG: a member that is a parent of several ancestors appears once.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m2n2_plugin.merge.kernel import MAX_SPLIT_POINTS
from m2n2_plugin.merge.kernel import split_point_names

#: Upper bound on the picture's side in inches (a run with thousands of merges in the best
#: model's ancestry still gives a file an image viewer opens).
MAX_INCHES = 80.0


@dataclass(frozen=True)
class Node:
    """One trial in the family tree."""

    number: int
    value: float | None
    generation: int
    seed_name: str | None = None
    parents: tuple[int, int] | None = None
    mix_ratio: float | None = None
    split_point: tuple[float, ...] = ()

    @property
    def label(self) -> str:
        """Two lines: who (seed name or trial number) and the mean score."""
        score = "?" if self.value is None else f"{self.value:.3f}"
        if self.seed_name is not None:
            return f"{self.seed_name}\n#{self.number}  {score}"
        return f"#{self.number}\n{score}"

    @property
    def merge_label(self) -> str:
        """The merge that made this child: mix ratio and split point."""
        return f"w={self.mix_ratio:.2f} s={split_text(self.split_point, 2)}"


def split_text(points: Sequence[float], digits: int) -> str:
    """Split points as the outputs print them: ``0.25``, or ``0.25/0.71`` for several."""
    return "/".join(f"{p:.{digits}f}" for p in points)


#: The split point a child was merged with, where it is not the drawn ``split_point`` param
#: (``search.split_over: differing`` maps the draw onto the tensors that differ).
SPLIT_POINT_ATTR = "m2n2.split_point"


def crossover(trial: Any) -> tuple[float, list[float]]:
    """``(mix_ratio, split points)`` a child was merged with: what its recipe must say.

    One split point (the paper), or several (``search.split_points``: ``split_point``,
    ``split_point_2``, ...), as merged (``m2n2.split_point`` where ``search.split_over``
    mapped the draws)."""
    merged = trial.user_attrs.get(SPLIT_POINT_ATTR)
    if merged is None:
        drawn = [trial.params[n] for n in split_point_names(MAX_SPLIT_POINTS) if n in trial.params]
        merged = drawn
    elif not isinstance(merged, list):  # one split point
        merged = [merged]
    return float(trial.params["mix_ratio"]), [float(p) for p in merged]


def ancestors_first(trials: Mapping[int, Any], number: int) -> list[int]:
    """Trial ``number`` and its ancestors back to the seeds, each once, parents before children.

    ``trials`` maps trial numbers to Optuna trials; a trial with ``m2n2.parents`` in its user
    attrs is a merge of those two, any other is a seed. Iterative (no recursion limit for deep
    lineages). The one walk of a lineage: the family tree and ``lineage.yml`` both use it.
    """
    order: list[int] = []
    done: set[int] = set()
    stack = [number]
    while stack:
        n = stack[-1]
        if n in done:
            stack.pop()
            continue
        parents = trials[n].user_attrs.get("m2n2.parents")
        todo = [int(p) for p in parents or () if int(p) not in done]
        if todo:
            stack.extend(todo)
            continue
        done.add(n)
        order.append(n)
        stack.pop()
    return order


def ancestry(trials: Mapping[int, Any], number: int) -> dict[int, Node]:
    """Trial ``number`` and every ancestor back to the seeds, by trial number.

    ``trials`` maps trial numbers to Optuna trials (``user_attrs`` with ``m2n2.seed`` /
    ``m2n2.model`` or ``m2n2.parents``, ``params`` with ``mix_ratio`` / ``split_point``).
    """
    nodes: dict[int, Node] = {}
    for n in ancestors_first(trials, number):
        trial = trials[n]
        attrs = trial.user_attrs
        value = None if trial.value is None else float(trial.value)
        if "m2n2.parents" not in attrs:
            name = attrs.get("m2n2.model")
            if name is None and "m2n2.seed" in attrs:
                name = f"seed {attrs['m2n2.seed']}"
            nodes[n] = Node(n, value, 0, seed_name=name)
            continue
        a, b = (int(p) for p in attrs["m2n2.parents"])
        mix_ratio, split_point = crossover(trial)
        nodes[n] = Node(
            n,
            value,
            1 + max(nodes[a].generation, nodes[b].generation),
            parents=(a, b),
            mix_ratio=mix_ratio,
            split_point=tuple(split_point),
        )
    return nodes


def layout(nodes: Mapping[int, Node]) -> dict[int, tuple[float, float]]:
    """(x, y) per node: y = -generation, x ordered within the layer to shorten edges.

    Barycentre ordering (a few sweeps down and up): each node moves towards the mean place of
    its parents, then of its children -- the standard layered-drawing heuristic, enough for
    trees of tens to hundreds of nodes. Layers are centred on each other.
    """
    layers: dict[int, list[int]] = {}
    for n in sorted(nodes):
        layers.setdefault(nodes[n].generation, []).append(n)
    children: dict[int, list[int]] = {n: [] for n in nodes}
    for n, node in nodes.items():
        for p in node.parents or ():
            children[p].append(n)
    order = {n: float(i) for layer in layers.values() for i, n in enumerate(layer)}

    def place(layer: list[int], neighbours: dict[int, list[int]]) -> None:
        def key(n: int) -> tuple[float, int]:
            near = neighbours[n]
            centre = sum(order[m] for m in near) / len(near) if near else order[n]
            return (centre, n)

        layer.sort(key=key)
        width = len(layer)
        for i, n in enumerate(layer):
            order[n] = i - (width - 1) / 2

    parents = {n: list(node.parents or ()) for n, node in nodes.items()}
    gens = sorted(layers)
    for n in order:  # centre every layer before the sweeps
        layer = layers[nodes[n].generation]
        order[n] = layer.index(n) - (len(layer) - 1) / 2
    for _ in range(4):
        for g in gens[1:]:
            place(layers[g], parents)
        for g in reversed(gens[:-1]):
            place(layers[g], children)
    return {n: (order[n], -float(nodes[n].generation)) for n in nodes}


#: Inches per layer and per column at full size, and the fonts (points) drawn at full size.
LAYER_INCHES = 1.35
COLUMN_INCHES = 1.5
NODE_FONT = 8.0
MERGE_FONT = 6.5
TICK_FONT = 7.0
#: Resolution at full size. A tree drawn smaller to fit ``MAX_INCHES`` gets more dots by the same
#: factor, so its text keeps its pixels and reads as well when zoomed in -- up to
#: ``MAX_PIXELS`` a side (matplotlib's Agg refuses 65,536; common image viewers open 30,000).
DPI = 110.0
MAX_PIXELS = 30000


def _size(pos: Mapping[int, tuple[float, float]]) -> tuple[float, float, float]:
    """Figure width and height (inches) and the scale of everything drawn in it.

    The tree needs ``LAYER_INCHES`` per generation and ``COLUMN_INCHES`` per column at full
    size. Capping the figure at ``MAX_INCHES`` without shrinking the text squeezed the layers
    of a deep tree (past ~60 generations) under their labels, which then crossed the nodes
    above. So a tree too big for the cap is drawn smaller as a whole: fonts, boxes, lines and
    spacing by one factor, which keeps every gap in proportion -- labels never overlap at any
    depth -- and :func:`draw` raises the resolution by that factor, so the pixels stay those of
    the full-size picture.
    """
    xs = [x for x, _ in pos.values()]
    ys = [y for _, y in pos.values()]
    width = max(6.0, COLUMN_INCHES * (max(xs) - min(xs) + 1) + 2.0)
    height = max(3.5, LAYER_INCHES * (max(ys) - min(ys) + 1) + 1.5)
    scale = min(1.0, MAX_INCHES / width, MAX_INCHES / height)
    return width * scale, height * scale, scale


def draw(nodes: Mapping[int, Node], best: int, title: str) -> tuple[Any, float]:
    """The tree as a matplotlib figure, and the resolution (dpi) to save it at.

    Split from :func:`save_png` so the figure can be measured (the tests ask the renderer
    where every label ends up and check that none overlaps another).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch

    pos = layout(nodes)
    # Long seed names (paths as written in the mergekit config) get wider columns.
    longest = max(len(line) for node in nodes.values() for line in node.label.splitlines())
    spread = max(1.0, (0.075 * longest + 0.4) / COLUMN_INCHES)
    pos = {n: (x * spread, y) for n, (x, y) in pos.items()}
    width, height, scale = _size(pos)
    dpi = min(DPI / scale, MAX_PIXELS / max(width, height))
    fig, ax = plt.subplots(figsize=(width, height))
    values = [n.value for n in nodes.values() if n.value is not None]
    norm = Normalize(vmin=min(values, default=0.0), vmax=max(values, default=1.0) or 1.0)
    cmap = plt.get_cmap("YlGn")
    lw = 0.9 * scale
    half_h = 0.2  # a node box's half height, in layer units
    for n, node in nodes.items():
        if node.parents is None:
            continue
        cx, cy = pos[n]
        join = (cx, cy + half_h + 0.12)  # where both edges meet, above the child
        for parent, style in zip(node.parents, ("-", "--"), strict=True):
            px, py = pos[parent]
            skip = py - cy > 1.5  # over several layers: bend around the nodes between
            ax.add_patch(
                FancyArrowPatch(
                    (px, py - half_h),
                    join,
                    arrowstyle="-",
                    linestyle=style,
                    color="#555555",
                    lw=lw,
                    alpha=0.8,
                    connectionstyle=f"arc3,rad={0.25 if skip else 0.0}",
                    zorder=1,
                )
            )
        ax.plot([join[0], cx], [join[1], cy + half_h], color="#555555", lw=lw, zorder=1)
        ax.text(
            join[0],
            join[1] + 0.02,
            node.merge_label,
            ha="center",
            va="bottom",
            fontsize=MERGE_FONT * scale,
            color="#1f3b73",
            # Opaque: an edge passing behind a label never runs through its text.
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none"},
            zorder=3,
        )
    for n, node in nodes.items():
        x, y = pos[n]
        # The light half of the colour map only: black text stays legible on every node.
        colour = "#dddddd" if node.value is None else cmap(0.05 + 0.5 * norm(node.value))
        ax.text(
            x,
            y,
            node.label,
            ha="center",
            va="center",
            fontsize=NODE_FONT * scale,
            fontweight="bold" if n == best else "normal",
            bbox={
                "boxstyle": "round,pad=0.3",
                "fc": colour,
                "ec": "#c0392b" if n == best else ("#1f3b73" if node.parents is None else "#555"),
                "lw": (2.2 if n == best else 0.8) * scale,
            },
            zorder=4,
        )
    xs = [x for x, _ in pos.values()]
    ys = [y for _, y in pos.values()]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
    gens = sorted({node.generation for node in nodes.values()})
    ax.set_yticks([-g for g in gens], [f"gen {g}" for g in gens], fontsize=TICK_FONT * scale)
    ax.tick_params(axis="y", length=3.5 * scale, width=0.8 * scale)
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.spines["left"].set_linewidth(0.8 * scale)
    ax.set_title(title, fontsize=10 * scale)
    ax.legend(
        handles=[
            Line2D([], [], color="#555555", lw=1.5 * scale, ls="-", label="from parent A (base)"),
            Line2D([], [], color="#555555", lw=1.5 * scale, ls="--", label="from parent B"),
            Line2D([], [], ls="", label="label: w = mix ratio, s = split point"),
            Line2D([], [], ls="", label="node: trial number, mean fitness"),
        ],
        # Just under the axes, the gap in font units (an axes fraction grows with the tree).
        loc="upper left",
        bbox_to_anchor=(0.0, 0.0),
        borderaxespad=0.3,
        ncol=2,
        fontsize=7 * scale,
        frameon=False,
    )
    return fig, dpi


def save_png(nodes: Mapping[int, Node], best: int, path: Path, title: str) -> None:
    """Draw the tree into ``path`` (PNG, matplotlib's Agg backend)."""
    import matplotlib.pyplot as plt

    fig, dpi = draw(nodes, best, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # "tight" keeps the legend under the axes inside the picture.
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)


def plotly_figure(nodes: Mapping[int, Node], best: int, title: str) -> Any:
    """The same tree as a plotly figure (for optuna-dashboard; hover shows each merge)."""
    import plotly.graph_objects as go

    pos = layout(nodes)
    edge_x: list[float | None] = []
    edge_y: list[float | None] = []
    dash_x: list[float | None] = []
    dash_y: list[float | None] = []
    for n, node in nodes.items():
        for parent, (xs, ys) in zip(
            node.parents or (), ((edge_x, edge_y), (dash_x, dash_y)), strict=False
        ):
            xs += [pos[parent][0], pos[n][0], None]
            ys += [pos[parent][1], pos[n][1], None]
    hover = []
    for node in nodes.values():
        text = node.label.replace("\n", "<br>")
        if node.parents is not None:
            a, b = node.parents
            text += f"<br>A=#{a} B=#{b}<br>{node.merge_label}"
        hover.append(text)
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(x=edge_x, y=edge_y, mode="lines", line={"color": "#777"}, name="parent A")
    )
    fig.add_trace(
        go.Scatter(
            x=dash_x, y=dash_y, mode="lines", line={"color": "#777", "dash": "dash"}, name="B"
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[pos[n][0] for n in nodes],
            y=[pos[n][1] for n in nodes],
            mode="markers+text",
            text=[f"#{n}" for n in nodes],
            textposition="top center",
            hovertext=hover,
            hoverinfo="text",
            marker={
                "size": [18 if n == best else 12 for n in nodes],
                "color": [node.value for node in nodes.values()],
                "colorscale": "YlGn",
                "showscale": True,
                "colorbar": {"title": "mean fitness"},
                "line": {"color": ["#c0392b" if n == best else "#333" for n in nodes]},
            },
            name="trial",
        )
    )
    merges = [n for n, node in nodes.items() if node.parents is not None]
    gens = sorted({node.generation for node in nodes.values()})
    fig.add_trace(
        go.Scatter(
            x=[pos[n][0] for n in merges],
            y=[pos[n][1] + 0.3 for n in merges],
            mode="text",
            text=[nodes[n].merge_label for n in merges],
            textfont={"size": 9, "color": "#1f3b73"},
            hoverinfo="skip",
            name="w, s",
        )
    )
    fig.update_layout(
        title=title,
        xaxis={"visible": False},
        yaxis={
            "title": "generation (0 = seeds)",
            "tickvals": [-g for g in gens],
            "ticktext": [str(g) for g in gens],
        },
        height=max(400, 90 * (1 + max(node.generation for node in nodes.values()))),
    )
    return fig
