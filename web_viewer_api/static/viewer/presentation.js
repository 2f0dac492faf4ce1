// A presentation state (PS3.3 C.11: GSPS and its colour/blending kin) applied to the images
// it references: its window (Softcopy VOI LUT), rotation and flip (Spatial Transformation),
// inverse presentation LUT, and its graphic annotations (graphics and texts) drawn over them.
import { value, values } from "./dicom.js";

/** Whether a PR item (VOI, annotation) with its Referenced Image Sequence applies to `sop`
 * (no sequence: to every image the presentation state references). */
function appliesTo(item, sop) {
  const images = values(item, "00081140");
  return !images.length || images.some((image) => value(image, "00081155") === sop);
}

/** What a presentation state shows, from its DICOM JSON metadata. */
export function presentationOf(metadata) {
  const referenced = values(metadata, "00081115");
  const voi = values(metadata, "00283110");
  return {
    label: String(value(metadata, "00700080") || ""),
    series: referenced.length ? value(referenced[0], "0020000E") : null,
    firstImage: referenced.length ? value(values(referenced[0], "00081140")[0] || {}, "00081155") : null,
    rotation: ((Number(value(metadata, "00700042")) || 0) % 360 + 360) % 360,
    flipH: value(metadata, "00700041") === "Y",
    inverse: value(metadata, "20500020") === "INVERSE",
    /** [center, width] of the window it sets for `sop`, or null. */
    windowFor(sop) {
      const item = voi.find((entry) => appliesTo(entry, sop) && Number(value(entry, "00281051")) > 0);
      return item ? [Number(value(item, "00281050")), Number(value(item, "00281051"))] : null;
    },
    annotationsFor(sop) { return values(metadata, "00700001").filter((item) => appliesTo(item, sop)); },
  };
}

/** Image coordinates of a point in PIXEL (image) or DISPLAY (fraction of the image) units. */
function imagePoint(units, x, y, info) {
  return units === "DISPLAY" ? [x * info.columns, y * info.rows] : [x, y];
}

/** Draw the annotations of `presentation` for image `sop` on `context`, through `screen`
 * (image point -> canvas point). */
export function drawPresentation(context, presentation, sop, info, screen, ratio) {
  context.save();
  context.strokeStyle = "#5ee0ff"; context.fillStyle = "#5ee0ff"; context.lineWidth = 1.5 * ratio;
  context.font = `${13 * ratio}px system-ui, sans-serif`;
  context.shadowColor = "#000"; context.shadowBlur = 2 * ratio;
  for (const annotation of presentation.annotationsFor(sop)) {
    for (const graphic of values(annotation, "00700009")) {
      const units = value(graphic, "00700005") || "PIXEL";
      const data = values(graphic, "00700022").map(Number);
      const points = [];
      for (let k = 0; k + 1 < data.length; k += 2) points.push(screen(imagePoint(units, data[k], data[k + 1], info)));
      if (!points.length) continue;
      const type = value(graphic, "00700023");
      context.beginPath();
      if (type === "CIRCLE" && points.length >= 2) {
        const [[cx, cy], [px, py]] = points;
        context.arc(cx, cy, Math.hypot(px - cx, py - cy), 0, 2 * Math.PI);
      } else if (type === "ELLIPSE" && points.length >= 4) {
        const [a, b, c, d] = points;  // the major axis' ends, then the minor axis'
        context.ellipse((a[0] + b[0]) / 2, (a[1] + b[1]) / 2, Math.hypot(b[0] - a[0], b[1] - a[1]) / 2,
          Math.hypot(d[0] - c[0], d[1] - c[1]) / 2, Math.atan2(b[1] - a[1], b[0] - a[0]), 0, 2 * Math.PI);
      } else if (type === "POINT") {
        for (const [x, y] of points) {
          context.moveTo(x - 5 * ratio, y); context.lineTo(x + 5 * ratio, y);
          context.moveTo(x, y - 5 * ratio); context.lineTo(x, y + 5 * ratio);
        }
      } else {  // POLYLINE, INTERPOLATED (drawn through its points)
        points.forEach(([x, y], k) => (k ? context.lineTo(x, y) : context.moveTo(x, y)));
      }
      if (value(graphic, "00700024") === "Y") {
        context.globalAlpha = 0.3; context.fill(); context.globalAlpha = 1;
      }
      context.stroke();
    }
    for (const text of values(annotation, "00700008")) {
      const anchor = values(text, "00700014").map(Number), box = values(text, "00700010").map(Number);
      const at = anchor.length === 2 ? imagePoint(value(text, "00700004") || "PIXEL", anchor[0], anchor[1], info)
        : box.length === 2 ? imagePoint(value(text, "00700003") || "PIXEL", box[0], box[1], info) : null;
      if (!at) continue;
      const [x, y] = screen(at);
      String(value(text, "00700006") || "").split(/\r?\n/)
        .forEach((line, k) => context.fillText(line, x + 4 * ratio, y + (k * 15 + 14) * ratio));
    }
  }
  context.restore();
}
