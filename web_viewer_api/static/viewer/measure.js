// Measurements on one frame, in image pixel coordinates (x along columns, y along rows; pixel
// (c, r) covers [c, c+1) x [r, r+1)), with the frame's Pixel Spacing (row spacing, column
// spacing, mm) and its modality values (stored value x slope + intercept).

function spacingOf(info) {
  const [row, column] = info.pixelSpacing.length === 2 && info.pixelSpacing[0] > 0 ? info.pixelSpacing : [0, 0];
  return row > 0 && column > 0 ? { row, column, unit: "mm" } : { row: 1, column: 1, unit: "px" };
}

/** Length of the segment a-b: {value, unit} (mm with a pixel spacing, else px). */
export function length(info, a, b) {
  const s = spacingOf(info);
  return { value: Math.hypot((b[0] - a[0]) * s.column, (b[1] - a[1]) * s.row), unit: s.unit };
}

/** Angle at `vertex` between the arms to `a` and `b`, in degrees (in patient space). */
export function angle(info, a, vertex, b) {
  const s = spacingOf(info);
  const u = [(a[0] - vertex[0]) * s.column, (a[1] - vertex[1]) * s.row];
  const v = [(b[0] - vertex[0]) * s.column, (b[1] - vertex[1]) * s.row];
  const norms = Math.hypot(...u) * Math.hypot(...v);
  if (!norms) return 0;
  return (Math.acos(Math.max(-1, Math.min(1, (u[0] * v[0] + u[1] * v[1]) / norms))) * 180) / Math.PI;
}

/** Statistics of the modality values of the pixels whose centre is inside the ellipse
 * inscribed in the box with corners a and b: {count, mean, sd, min, max, area, unit}. */
export function ellipseStats(info, data, a, b) {
  const cx = (a[0] + b[0]) / 2, cy = (a[1] + b[1]) / 2;
  const rx = Math.abs(b[0] - a[0]) / 2, ry = Math.abs(b[1] - a[1]) / 2;
  const s = spacingOf(info);
  const out = { count: 0, mean: NaN, sd: NaN, min: NaN, max: NaN, area: Math.PI * rx * ry * s.row * s.column, unit: s.unit };
  if (!rx || !ry || info.samples !== 1) return out;
  let sum = 0, sumSquares = 0, min = Infinity, max = -Infinity;
  for (let r = Math.max(0, Math.floor(cy - ry)); r <= Math.min(info.rows - 1, Math.ceil(cy + ry)); r++) {
    for (let c = Math.max(0, Math.floor(cx - rx)); c <= Math.min(info.columns - 1, Math.ceil(cx + rx)); c++) {
      const dx = (c + 0.5 - cx) / rx, dy = (r + 0.5 - cy) / ry;
      if (dx * dx + dy * dy > 1) continue;
      const v = data[r * info.columns + c] * info.slope + info.intercept;
      sum += v; sumSquares += v * v; out.count++;
      if (v < min) min = v;
      if (v > max) max = v;
    }
  }
  if (out.count) {
    out.mean = sum / out.count;
    out.sd = Math.sqrt(Math.max(0, sumSquares / out.count - out.mean * out.mean));
    out.min = min; out.max = max;
  }
  return out;
}

/** The stored and modality value of the pixel under point p, or null outside the image. */
export function probe(info, data, p) {
  const c = Math.floor(p[0]), r = Math.floor(p[1]);
  if (c < 0 || r < 0 || c >= info.columns || r >= info.rows || info.samples !== 1) return null;
  const stored = data[r * info.columns + c];
  return { column: c, row: r, stored, value: stored * info.slope + info.intercept };
}

/** A round length (mm) for a scale bar at most `maxMm` long. */
export function scaleBarMm(maxMm) {
  const steps = [1, 2, 5, 10, 20, 50, 100, 200, 500];
  let chosen = 0;
  for (const step of steps) if (step <= maxMm) chosen = step;
  return chosen;
}
