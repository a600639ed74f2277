// A small SVG line chart: named series of (x, y) points, axes with round ticks, a legend.
// Redraws at most once per animation frame however many points arrive.
"use strict";

const CHART_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                       "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];
const SVG_NS = "http://www.w3.org/2000/svg";

function niceTicks(lo, hi, count) {
  // Round tick values (1, 2 or 5 times a power of ten) covering [lo, hi].
  if (!(hi > lo)) { hi = lo + (Math.abs(lo) || 1); }
  const raw = (hi - lo) / Math.max(1, count);
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * power).find(s => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) {
    ticks.push(Number(t.toPrecision(12)));
  }
  return ticks;
}

function formatNumber(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) { return v.toExponential(1); }
  return String(Number(v.toPrecision(4)));
}

class LineChart {
  constructor(container, options = {}) {
    this.container = container;
    this.width = options.width || 460;
    this.height = options.height || 230;
    this.margin = {left: 56, right: 12, top: 10, bottom: 34};
    this.xLabel = options.xLabel || "iteration";
    this.fromZero = Boolean(options.fromZero);   // accuracies: 0 at the bottom; losses: fitted
    this.series = new Map();          // name -> {points: [[x, y]], colour}
    this.pending = false;
    this.svg = document.createElementNS(SVG_NS, "svg");
    this.svg.setAttribute("viewBox", `0 0 ${this.width} ${this.height}`);
    this.svg.setAttribute("class", "line-chart");
    container.appendChild(this.svg);
    this.legend = document.createElement("div");
    this.legend.className = "legend";
    container.appendChild(this.legend);
    this.draw();
  }

  add(name, x, y) {
    if (!Number.isFinite(x) || !Number.isFinite(y)) { return; }
    if (!this.series.has(name)) {
      this.series.set(name, {points: [], colour: CHART_COLOURS[this.series.size % CHART_COLOURS.length]});
    }
    this.series.get(name).points.push([x, y]);
    this.schedule();
  }

  set(name, points) {
    // Replace a series' points at once (a derived series decided after the fact).
    if (!this.series.has(name)) {
      this.series.set(name, {points: [], colour: CHART_COLOURS[this.series.size % CHART_COLOURS.length]});
    }
    this.series.get(name).points = points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    this.schedule();
  }

  pointCount() {
    let n = 0;
    for (const s of this.series.values()) { n += s.points.length; }
    return n;
  }

  schedule() {
    if (this.pending) { return; }
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }

  extent() {
    let xs = [], ys = [];
    for (const s of this.series.values()) {
      for (const [x, y] of s.points) { xs.push(x); ys.push(y); }
    }
    if (!xs.length) { return null; }
    const lo = a => a.reduce((m, v) => Math.min(m, v), Infinity);
    const hi = a => a.reduce((m, v) => Math.max(m, v), -Infinity);
    let y0 = lo(ys), y1 = hi(ys);
    if (this.fromZero) { y0 = Math.min(0, y0); }
    else { const pad = (y1 - y0) * 0.05 || Math.abs(y1) * 0.05 || 1; y0 -= pad; y1 += pad; }
    return {x0: Math.min(0, lo(xs)), x1: hi(xs), y0, y1};
  }

  element(tag, attributes, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attributes)) { node.setAttribute(k, v); }
    if (text !== undefined) { node.textContent = text; }
    this.svg.appendChild(node);
    return node;
  }

  draw() {
    this.svg.replaceChildren();
    const m = this.margin, w = this.width - m.left - m.right, h = this.height - m.top - m.bottom;
    this.svg.setAttribute("data-points", String(this.pointCount()));
    const e = this.extent();
    if (!e) {
      this.element("text", {x: m.left + w / 2, y: m.top + h / 2, "text-anchor": "middle",
                            class: "empty"}, "waiting for data…");
      return;
    }
    const xt = niceTicks(e.x0, e.x1, 5), yt = niceTicks(e.y0, e.y1, 4);
    const x0 = Math.min(e.x0, xt[0]), x1 = Math.max(e.x1, xt[xt.length - 1]);
    const y0 = Math.min(e.y0, yt[0]), y1 = Math.max(e.y1, yt[yt.length - 1]);
    const sx = x => m.left + (x1 > x0 ? (x - x0) / (x1 - x0) * w : w / 2);
    const sy = y => m.top + h - (y1 > y0 ? (y - y0) / (y1 - y0) * h : h / 2);
    for (const t of yt) {
      this.element("line", {x1: m.left, x2: m.left + w, y1: sy(t), y2: sy(t), class: "grid"});
      this.element("text", {x: m.left - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick"},
                   formatNumber(t));
    }
    for (const t of xt) {
      this.element("line", {x1: sx(t), x2: sx(t), y1: m.top + h, y2: m.top + h + 4, class: "axis"});
      this.element("text", {x: sx(t), y: m.top + h + 16, "text-anchor": "middle", class: "tick"},
                   formatNumber(t));
    }
    this.element("line", {x1: m.left, x2: m.left + w, y1: m.top + h, y2: m.top + h, class: "axis"});
    this.element("line", {x1: m.left, x2: m.left, y1: m.top, y2: m.top + h, class: "axis"});
    this.element("text", {x: m.left + w / 2, y: this.height - 4, "text-anchor": "middle",
                          class: "label"}, this.xLabel);
    this.legend.replaceChildren();
    for (const [name, s] of this.series) {
      const path = s.points.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`);
      this.element("path", {d: path.join(""), stroke: s.colour, class: "series",
                            "data-series": name, "data-count": String(s.points.length)});
      if (s.points.length === 1 || s.points.length < 30) {
        for (const [x, y] of s.points) {
          this.element("circle", {cx: sx(x), cy: sy(y), r: 2.5, fill: s.colour});
        }
      }
      const last = s.points[s.points.length - 1][1];
      const item = document.createElement("span");
      item.innerHTML = `<i style="background:${s.colour}"></i>`;
      item.appendChild(document.createTextNode(`${name} ${formatNumber(last)}`));
      this.legend.appendChild(item);
    }
  }
}
