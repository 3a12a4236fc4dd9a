"""Charts drawn on the server as inline SVG: no script, no network, coloured by the page's stylesheet (light and
dark themes alike)."""

from __future__ import annotations

from datetime import date
from html import escape


def bar_chart(days: list[date], values: list[float], *, title: str, unit: str, css_class: str, width: int = 360) -> str:
    """One bar per day, with the largest value and the first and last days written on the axes."""
    height, left, bottom, top = 140, 46, 20, 18
    plot_w, plot_h = width - left - 6, height - bottom - top
    peak = max(values, default=0) or 1
    step = plot_w / max(len(days), 1)
    bars = []
    for position, (day, value) in enumerate(zip(days, values, strict=True)):
        bar_h = plot_h * value / peak
        x = left + position * step
        bars.append(
            f'<rect class="{css_class}" x="{x + 1:.1f}" y="{top + plot_h - bar_h:.1f}" '
            f'width="{max(step - 2, 1):.1f}" height="{bar_h:.1f}">'
            f"<title>{day.isoformat()}: {_number(value)} {escape(unit)}</title></rect>"
        )
    first = days[0].strftime("%d %b") if days else ""
    last = days[-1].strftime("%d %b") if days else ""
    return (
        f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f'<text class="chart-title" x="{left}" y="12">{escape(title)}</text>'
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - 6}" y2="{top + plot_h}"/>'
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>'
        f'<text class="tick" x="{left - 4}" y="{top + 8}" text-anchor="end">{_number(max(values, default=0))}</text>'
        f'<text class="tick" x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>'
        f'<text class="tick" x="{left}" y="{height - 4}">{first}</text>'
        f'<text class="tick" x="{width - 6}" y="{height - 4}" text-anchor="end">{last}</text>'
        + "".join(bars)
        + "</svg>"
    )


def sparkline(values: list[float], *, label: str, width: int = 120, height: int = 24) -> str:
    """A source's rows loaded per day, as a small line in its overview row."""
    peak = max(values, default=0) or 1
    step = width / max(len(values) - 1, 1)
    points = " ".join(f"{i * step:.1f},{height - 2 - (height - 4) * v / peak:.1f}" for i, v in enumerate(values))
    return (
        f'<svg class="spark" role="img" aria-label="{escape(label)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(label)}</title>"
        f'<polyline class="spark-line" fill="none" points="{points}"/></svg>'
    )


def step_bars(steps: dict[str, float], *, width: int = 260) -> dict[str, str]:
    """A horizontal bar per step of a batch, scaled to the longest, keyed by step name."""
    longest = max(steps.values(), default=0) or 1
    return {
        name: (
            f'<svg class="step" width="{width}" height="12" viewBox="0 0 {width} 12" '
            f'xmlns="http://www.w3.org/2000/svg"><rect class="step-bar" x="0" y="1" height="10" '
            f'width="{max(width * seconds / longest, 1):.1f}"/></svg>'
        )
        for name, seconds in steps.items()
    }


def _number(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f} M"
    if value >= 10_000:
        return f"{value / 1_000:.0f} k"
    if value != int(value):
        return f"{value:.1f}"
    return f"{int(value):,}"
