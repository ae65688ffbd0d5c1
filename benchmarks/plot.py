"""A latency-CDF chart as a PNG, drawn with nothing but ``zlib`` and ``struct``.

One chart per benchmark does not justify a plotting stack (matplotlib and its six dependencies) in the
project's environment: this module rasterises a small RGB canvas (lines, rectangles, a 5x7 bitmap font)
and encodes it as a PNG (RFC 2083: signature, IHDR, one zlib IDAT, IEND, each chunk CRC-32'd).

The chart: latency on a log₁₀ x axis; the cumulative fraction on a y axis stretched towards the tail
(``y = -log₁₀(1 - q)``, so 0 %, 90 %, 99 %, 99.9 % are equally spaced), one line per policy, the legend
giving each policy's p99. ``python -m benchmarks.routing`` draws one beside its JSON results; ``python -m
benchmarks.plot LATENCIES.json`` draws one from a JSON object of series (name → latencies in ms).
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

Color = tuple[int, int, int]

WHITE: Color = (255, 255, 255)
BLACK: Color = (30, 30, 30)
GRID: Color = (225, 225, 225)
AXIS: Color = (120, 120, 120)
PALETTE: tuple[Color, ...] = (
    (220, 110, 20),  # orange
    (40, 100, 200),  # blue
    (20, 150, 60),  # green
    (160, 60, 170),  # purple
    (200, 40, 40),  # red
    (90, 90, 90),  # grey
)
POLICY_COLORS: dict[str, Color] = {
    "round_robin": PALETTE[0],
    "least_request": PALETTE[1],
    "picker": PALETTE[2],
}

# 5x7 glyphs, rows top to bottom, '#' = ink. Letters are drawn upper-case.
_FONT_ROWS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
    ".": (".....", ".....", ".....", ".....", ".....", ".##..", ".##.."),
    ",": (".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."),
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    "_": (".....", ".....", ".....", ".....", ".....", ".....", "#####"),
    "/": (".....", "....#", "...#.", "..#..", ".#...", "#....", "....."),
    "(": ("...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."),
    ")": (".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."),
    "%": ("##...", "##..#", "...#.", "..#..", ".#...", "#..##", "...##"),
    ":": (".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."),
    "=": (".....", ".....", "#####", ".....", "#####", ".....", "....."),
    "+": (".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."),
    " ": (".....", ".....", ".....", ".....", ".....", ".....", "....."),
}
_UNKNOWN = ("#####", "#...#", "#...#", "#...#", "#...#", "#...#", "#####")
GLYPH_W, GLYPH_H = 5, 7


class Canvas:
    """An RGB raster with the few drawing operations a chart needs."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width = width
        self.height = height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def get(self, x: int, y: int) -> Color:
        i = 3 * (y * self.width + x)
        return (self.pixels[i], self.pixels[i + 1], self.pixels[i + 2])

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fill [x0, x1] x [y0, y1] (inclusive, clipped)."""
        for y in range(max(0, min(y0, y1)), min(self.height - 1, max(y0, y1)) + 1):
            for x in range(max(0, min(x0, x1)), min(self.width - 1, max(x0, x1)) + 1):
                self.set(x, y, color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, width: int = 1) -> None:
        steps = max(1, math.ceil(max(abs(x1 - x0), abs(y1 - y0))))
        half = (width - 1) // 2
        for k in range(steps + 1):
            x = round(x0 + (x1 - x0) * k / steps)
            y = round(y0 + (y1 - y0) * k / steps)
            if width == 1:
                self.set(x, y, color)
            else:
                self.rect(x - half, y - half, x - half + width - 1, y - half + width - 1, color)

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 2) -> None:
        """Draw ``text`` with its top-left corner at (x, y)."""
        for i, char in enumerate(text.upper()):
            rows = _FONT_ROWS.get(char, _UNKNOWN)
            ox = x + i * (GLYPH_W + 1) * scale
            for ry, row in enumerate(rows):
                for rx, cell in enumerate(row):
                    if cell == "#":
                        x0, y0 = ox + rx * scale, y + ry * scale
                        self.rect(x0, y0, x0 + scale - 1, y0 + scale - 1, color)

    @staticmethod
    def text_width(text: str, scale: int = 2) -> int:
        return len(text) * (GLYPH_W + 1) * scale - scale if text else 0

    def png(self) -> bytes:
        raw = bytearray()
        stride = 3 * self.width
        for y in range(self.height):
            raw.append(0)  # filter type 0 (None) for every scanline
            raw += self.pixels[y * stride : (y + 1) * stride]
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(bytes(raw), 9))
            + _chunk(b"IEND", b"")
        )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def tail_y(q: float, q_max: float) -> float:
    """The stretched CDF axis: -log₁₀(1 - q), with q capped at ``q_max``."""
    return -math.log10(1.0 - min(q, q_max))


def _x_ticks(lo_exp: int, hi_exp: int) -> list[float]:
    ticks = []
    mantissas = (1.0, 2.0, 5.0) if hi_exp - lo_exp <= 3 else (1.0,)
    for e in range(lo_exp, hi_exp + 1):
        for m in mantissas:
            ticks.append(m * 10.0**e)
    return ticks


def _format_ms(value: float) -> str:
    return f"{value:g}" if value >= 1 else f"{value:.2g}"


def latency_cdf_png(
    series: Mapping[str, Sequence[float]],
    title: str,
    width: int = 960,
    height: int = 600,
) -> bytes:
    """The PNG of the latency CDFs of ``series`` (policy name → latencies in ms, any order)."""
    # The legend goes under the chart, one row per series, so it never hides a line.
    canvas = Canvas(width, height + 24 * len(series))
    left, right, top, bottom = 90, width - 30, 60, height - 80
    data = {name: sorted(v for v in values if v > 0 and math.isfinite(v)) for name, values in series.items()}
    everything = [v for values in data.values() for v in values]
    canvas.text(left, 20, title)
    if not everything:
        canvas.text(left, top + 40, "no successful requests")
        return canvas.png()
    lo_exp = math.floor(math.log10(min(everything)))
    # The axis ends a little past the slowest request, not at the next power of ten.
    hi = max(math.log10(max(everything)) + 0.08, lo_exp + 1.0)
    n_max = max(len(v) for v in data.values())
    # Stretch the tail only as far as the samples resolve it: 99.9 % needs ~1000 samples.
    decades = 3 if n_max >= 1000 else 2
    q_max = 1.0 - 10.0**-decades

    def px(latency_ms: float) -> float:
        return left + (math.log10(latency_ms) - lo_exp) / (hi - lo_exp) * (right - left)

    def py(q: float) -> float:
        return bottom - tail_y(q, q_max) / decades * (bottom - top)

    # Grid and axes.
    for tick in _x_ticks(lo_exp, math.ceil(hi)):
        if math.log10(tick) > hi:
            continue
        x = round(px(tick))
        canvas.line(x, top, x, bottom, GRID)
        label = _format_ms(tick)
        canvas.text(x - Canvas.text_width(label) // 2, bottom + 8, label)
    y_ticks = [(0.0, "0%"), (0.5, "50%"), (0.9, "90%"), (0.99, "99%"), (0.999, "99.9%")]
    for q, label in y_ticks:
        if q > q_max + 1e-12:
            continue
        y = round(py(q))
        canvas.line(left, y, right, y, GRID)
        canvas.text(left - 8 - Canvas.text_width(label), y - GLYPH_H, label)
    canvas.line(left, bottom, right, bottom, AXIS)
    canvas.line(left, top, left, bottom, AXIS)
    x_label = "latency (ms, log scale), from intended send time"
    canvas.text((left + right - Canvas.text_width(x_label)) // 2, bottom + 40, x_label)

    # One line per series: the empirical CDF, q = (i + 1) / n at the i-th smallest latency.
    legends = []
    for k, (name, values) in enumerate(data.items()):
        color = POLICY_COLORS.get(name, PALETTE[k % len(PALETTE)])
        n = len(values)
        last: tuple[float, float] | None = None
        for i, v in enumerate(values):
            point = (px(v), py((i + 1) / n))
            if last is not None and (abs(point[0] - last[0]) >= 1 or abs(point[1] - last[1]) >= 1 or i == n - 1):
                canvas.line(last[0], last[1], point[0], point[1], color, width=2)
                last = point
            elif last is None:
                last = point
        p99 = values[min(n, max(1, math.ceil(0.99 * n))) - 1] if n else math.nan
        legends.append((color, f"{name}  p99 {p99:.1f} ms  n={n}"))
    for k, (color, text) in enumerate(legends):
        y = height + 24 * k - 8
        canvas.rect(left + 10, y + 5, left + 40, y + 8, color)
        canvas.text(left + 50, y, text)
    return canvas.png()


def write_latency_cdf(path: Path, series: Mapping[str, Sequence[float]], title: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(latency_cdf_png(series, title))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plot",
        description="A latency-CDF PNG from a JSON object: series name -> latencies (ms).",
    )
    parser.add_argument("latencies", type=Path, help='JSON file: {"picker": [1.2, 3.4, ...], ...}')
    parser.add_argument("--output", "-o", type=Path, help="the PNG (default: the JSON path with .png)")
    parser.add_argument("--title", help="chart title (default: the JSON file's name)")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.latencies.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"benchmarks.plot: cannot read {args.latencies}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(isinstance(x, int | float) for x in v) for v in data.values()
    ):
        print(f"benchmarks.plot: {args.latencies}: expected an object of lists of numbers", file=sys.stderr)
        return 2
    series = {str(name): [float(x) for x in values] for name, values in data.items()}
    output = args.output or args.latencies.with_suffix(".png")
    write_latency_cdf(output, series, args.title or f"{args.latencies.stem}: latency cdf")
    print(f"plot: {output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
