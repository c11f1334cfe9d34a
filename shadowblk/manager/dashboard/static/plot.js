// Small hand-written SVG line plots: series of [t, value] points on a shared time axis.
"use strict";

const PLOT_COLOURS = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#57606a"];
const SVG_NS = "http://www.w3.org/2000/svg";

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// Draw SERIES ({name: [[t, v], ...]}) into the <svg> SVG: at most the last WINDOW seconds.
function linePlot(svg, series, window, fixedMax) {
  const w = svg.clientWidth || 420, h = svg.clientHeight || 180;
  const pad = {l: 44, r: 8, t: 8, b: 20};
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const names = Object.keys(series);
  let tMax = 0, tFirst = Infinity, vMax = fixedMax || 0;
  for (const n of names) {
    for (const [t, v] of series[n]) {
      tMax = Math.max(tMax, t); tFirst = Math.min(tFirst, t); vMax = Math.max(vMax, v);
    }
  }
  if (!names.length || !tMax) {
    svg.appendChild(svgEl("text", {x: w / 2, y: h / 2, "text-anchor": "middle", fill: "#6e7781"}, "no data yet"));
    return;
  }
  vMax = vMax || 1;
  // a young history fills the plot; an old one scrolls through the last WINDOW seconds
  const span = Math.min(window, Math.max(tMax - tFirst, 10));
  const tMin = tMax - span;
  const x = t => pad.l + (t - tMin) / span * (w - pad.l - pad.r);
  const y = v => h - pad.b - v / vMax * (h - pad.t - pad.b);
  for (const f of [0, 0.5, 1]) {
    svg.appendChild(svgEl("line", {x1: pad.l, x2: w - pad.r, y1: y(f * vMax), y2: y(f * vMax), stroke: "#e3e6ea"}));
    svg.appendChild(svgEl("text", {x: pad.l - 4, y: y(f * vMax) + 4, "text-anchor": "end", class: "legend"},
                          (f * vMax).toPrecision(2)));
  }
  svg.appendChild(svgEl("text", {x: pad.l, y: h - 4, class: "legend"}, `-${Math.round(span)} s`));
  svg.appendChild(svgEl("text", {x: w - pad.r, y: h - 4, "text-anchor": "end", class: "legend"}, "now"));
  names.forEach((n, i) => {
    const pts = series[n].filter(([t]) => t >= tMin);
    const colour = PLOT_COLOURS[i % PLOT_COLOURS.length];
    if (pts.length) {
      svg.appendChild(svgEl("polyline", {
        points: pts.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" "),
        fill: "none", stroke: colour, "stroke-width": 1.5, "data-series": n,
      }));
    }
    svg.appendChild(svgEl("text", {x: pad.l + 6, y: pad.t + 12 + 12 * i, fill: colour, class: "legend"}, n));
  });
}
