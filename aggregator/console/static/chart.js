// Bar charts drawn as SVG by hand: a few dozen lines instead of a charting library (no
// dependency, nothing to fetch). Each series is a bar per label, side by side, or `stacked`
// one on another (positive values up, negative down); `marks` are vertical lines at labels
// (credits, resets) with their text as a tooltip.
import { fmt, h } from "./dom.js";

const W = 960;
const H = 260;
const PAD = { left: 72, right: 12, top: 12, bottom: 44 };

function niceStep(span) {
  const raw = span / 4 || 1;
  const power = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
}

// Where each series' bar of each label starts and ends: from 0 side by side, or stacked.
function spans(series, labels, stacked) {
  const up = labels.map(() => 0);
  const down = labels.map(() => 0);
  return series.map((s) =>
    s.values.map((v, j) => {
      if (!stacked) return [0, v];
      const sums = v >= 0 ? up : down;
      const base = sums[j];
      sums[j] += v;
      return [base, sums[j]];
    }),
  );
}

export function barChart({ labels, series, marks = [], caption, stacked = false }) {
  const ranges = spans(series, labels, stacked);
  const values = ranges.flat(2);
  const step = niceStep(Math.max(0, ...values) - Math.min(0, ...values));
  const high = Math.ceil(Math.max(0, ...values) / step) * step || step;
  const low = Math.floor(Math.min(0, ...values) / step) * step;
  const innerW = W - PAD.left - PAD.right;
  const innerH = H - PAD.top - PAD.bottom;
  const y = (v) => PAD.top + ((high - v) / (high - low)) * innerH;
  const band = innerW / Math.max(1, labels.length);
  const columns = stacked ? 1 : series.length;
  const barW = Math.max(1, Math.min(48, (band * 0.8) / columns));
  const inset = (band - barW * columns) / 2; // the group centred in its band
  const every = Math.ceil(labels.length / 12);
  const grid = [];
  for (let v = low; v <= high + step / 2; v += step) {
    grid.push(
      h("line", { class: "grid", x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v) }),
      h("text", { class: "tick", x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end", text: fmt.number(v) }),
    );
  }
  const bars = series.flatMap((s, i) =>
    s.values.map((v, j) =>
      h(
        "rect",
        {
          class: `bar ${s.class || ""}`,
          x: PAD.left + j * band + inset + (stacked ? 0 : i) * barW,
          y: Math.min(y(ranges[i][j][0]), y(ranges[i][j][1])),
          width: barW,
          height: Math.abs(y(ranges[i][j][1]) - y(ranges[i][j][0])),
        },
        h("title", { text: `${labels[j]} · ${s.name}: ${fmt.number(v)}` }),
      ),
    ),
  );
  const ticks = labels.map((label, j) =>
    j % every
      ? null
      : h("text", { class: "tick", x: PAD.left + (j + 0.5) * band, y: H - PAD.bottom + 16, "text-anchor": "middle", text: label }),
  );
  const lines = marks.map(({ index, text, kind }) =>
    h(
      "line",
      { class: `mark ${kind}`, x1: PAD.left + (index + 0.5) * band, x2: PAD.left + (index + 0.5) * band, y1: PAD.top, y2: H - PAD.bottom },
      h("title", { text }),
    ),
  );
  const svg = h("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": caption }, grid, bars, lines, ticks);
  const legend = h(
    "p",
    { class: "legend" },
    series.map((s) => h("span", { class: `key ${s.class || ""}`, text: s.name })),
    marks.length ? h("span", { class: "key mark", text: "credit / reset" }) : null,
  );
  return h("figure", { class: "chart" }, svg, h("figcaption", { text: caption }), legend);
}
