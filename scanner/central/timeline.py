"""`trace --plot`: the answer as a timeline a health officer can read at a glance.

One panel per site, time across in the sites' own time zone. The top lane is the subject (the
case): their stays in red, the margin around them shaded. Below, one lane per contact: their
stays in grey-blue, and the part that overlaps the case's (widened) stay in orange. A stay
whose end or start was not seen is hatched and says so in the bar: ``inferred`` (no exit:
closed at day end, after max_stay_h or at the next entry), ``open start`` (an exit with no
entry), ``entry only`` (a site with no exit gate: default_stay_min assumed).

matplotlib draws it: axis ticks on local time, hatching, legends, and SVG (text kept as text,
so the file can be searched for a pseudonym) and PNG from one figure. It is heavy (about
40 MB and a second to load), so it is only loaded when a plot is asked for, and it is an
optional extra: the collector never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from scanner.events import parse_utc

MAX_LANES = 40  # contacts per site panel; the rest are in the table and counted under the panel
CASE, CONTACT, OVERLAP, MARGIN = "#b2182b", "#8fa8c8", "#f28e2b", "#f4c7c3"
HATCH = {"paired": "", "inferred": "///", "open_start": "\\\\\\", "entry_only": "..."}
LABEL = {"inferred": "inferred", "open_start": "open start", "entry_only": "entry only"}
LEGEND = {
    "paired": "entry and exit seen",
    "inferred": "inferred end (no exit seen)",
    "open_start": "open start (exit with no entry)",
    "entry_only": "entry only (site has no exit gate)",
}


def draw(
    rows: Sequence[Any],
    path: Path,
    *,
    subjects: Sequence[str],
    period: tuple[datetime, datetime],
    margin: timedelta,
    zone: tzinfo,
    zone_name: str,
) -> None:
    """Write the timeline of ``rows`` (``trace.TraceRow``s) to ``path`` (.svg or .png)."""
    # matplotlib is heavy (see the module doc): only a plot loads it.
    import matplotlib  # heavy: only a plot needs it
    from matplotlib import dates as mdates  # heavy: only a plot needs it
    from matplotlib.figure import Figure  # heavy: only a plot needs it
    from matplotlib.patches import Patch  # heavy: only a plot needs it

    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: searchable, selectable

    sites: dict[str, list[Any]] = {}
    for row in rows:
        sites.setdefault(row.site, []).append(row)
    # Of the pseudonyms tried (one per credential type), the ones that have stays.
    found = sorted({row.subject for row in rows if row.kind == "stay"}) or list(subjects[:1])
    case = " / ".join(s[:8] for s in found)
    start, end = (f"{moment.astimezone(zone):%Y-%m-%d %H:%M}" for moment in period)
    title = f"Contacts of {case}, {start} to {end} ({zone_name}); margin {_span(margin)}"
    lanes_per_site = {site: _lanes(site_rows) for site, site_rows in sites.items()}
    height = 1.2 + sum(1.1 + 0.32 * (1 + min(len(lanes), MAX_LANES)) for lanes in lanes_per_site.values())
    fig = Figure(figsize=(13, max(height, 2.5)), layout="constrained")
    fig.suptitle(title, fontsize=11)
    if not sites:
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no stays in this period", ha="center", va="center", fontsize=12)
        fig.savefig(path)
        return
    ratios = [1 + min(len(lanes), MAX_LANES) for lanes in lanes_per_site.values()]
    axes = fig.subplots(len(sites), 1, squeeze=False, height_ratios=ratios)[:, 0]
    kinds_seen: set[str] = set()
    for ax, (site, site_rows) in zip(axes, sites.items(), strict=True):
        lanes = lanes_per_site[site]
        shown = lanes[:MAX_LANES]
        labels = [f"case {case}"] + [f"{subject[:8]}" for subject in shown]
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylim(len(labels) - 0.5, -0.6)
        ax.set_title(f"site {site}: {len(lanes)} contacts", loc="left", fontsize=10)
        for row in site_rows:
            kinds_seen.add(row.stay)
            s, e = _local(row.start, zone), _local(row.end, zone)
            if row.kind == "stay":
                if margin:
                    ax.axvspan(s - margin, e + margin, ymin=0, ymax=1, color=MARGIN, alpha=0.35, lw=0)
                _bar(ax, 0, s, e, CASE, row.stay)
            elif row.subject in shown:
                lane = 1 + shown.index(row.subject)
                _bar(ax, lane, s, e, CONTACT, row.stay)
                o_s, o_e = _local(row.overlap_start, zone), _local(row.overlap_end, zone)
                # Above every stay bar: a contact's stay drawn again for the case's next stay
                # must not hide the overlap with the one before.
                ax.barh(
                    lane, max(o_e - o_s, timedelta(seconds=30)), left=o_s, height=0.3, color=OVERLAP, zorder=3
                )
        if len(lanes) > MAX_LANES:
            ax.set_xlabel(
                f"… and {len(lanes) - MAX_LANES} more contacts at {site} (see the table)", fontsize=8
            )
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%d %b %H:%M", tz=zone))
        ax.grid(axis="x", color="#dddddd", lw=0.6)
        ax.tick_params(axis="x", labelsize=8)
    handles = [Patch(facecolor=CASE, label="case's stay")]
    if margin:
        handles.append(Patch(facecolor=MARGIN, label=f"margin ({_span(margin)})"))
    handles += [Patch(facecolor=CONTACT, label="contact's stay"), Patch(facecolor=OVERLAP, label="overlap")]
    handles += [
        Patch(facecolor="white", edgecolor="black", hatch=HATCH[k], label=LEGEND[k])
        for k in LEGEND
        if k in kinds_seen
    ]
    axes[0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    fig.savefig(path)


def _lanes(site_rows: Sequence[Any]) -> list[str]:
    """Contacts in the order they first overlapped the case."""
    first: dict[str, str] = {}
    for row in site_rows:
        if row.kind == "contact":
            first[row.subject] = min(first.get(row.subject, row.overlap_start), row.overlap_start)
    return sorted(first, key=lambda s: (first[s], s))


def _bar(ax: Any, lane: int, start: datetime, end: datetime, color: str, kind: str) -> None:
    width = max(end - start, timedelta(seconds=30))  # a zero-length stay still shows
    ax.barh(
        lane, width, left=start, height=0.6, color=color, hatch=HATCH.get(kind, ""), edgecolor="black", lw=0.4
    )
    if kind in LABEL:
        ax.text(start + width / 2, lane, LABEL[kind], ha="center", va="center", fontsize=6.5, color="black")


def _local(text: str, zone: tzinfo) -> datetime:
    return parse_utc(text).astimezone(zone)


def _span(span: timedelta) -> str:
    minutes = int(span.total_seconds() // 60)
    if minutes == 0:
        return "none"
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"
