// DICOMweb access and pixel rendering for the viewer (plain ES module, no dependencies).

const COMPRESSED_SYNTAXES_NATIVE = new Set([
  "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
]);

/** The first value of a DICOM JSON attribute (by tag), or undefined. */
export function value(item, tag, index = 0) {
  const element = item && item[tag];
  if (!element || !element.Value || element.Value.length <= index) return undefined;
  const found = element.Value[index];
  if (element.vr === "PN" && found && typeof found === "object") return found.Alphabetic || "";
  return found;
}

export function values(item, tag) {
  const element = item && item[tag];
  return element && element.Value ? element.Value : [];
}

// Stored syntaxes whose frames travel as stored and are decoded here (grayscale frames):
// the frame of a 512x512 CT slice is ~80 KB instead of 512 KB.
const BROWSER_DECODED = new Map([
  ["1.2.840.10008.1.2.4.201", ["htj2k", "image/jphc"]], ["1.2.840.10008.1.2.4.202", ["htj2k", "image/jphc"]],
  ["1.2.840.10008.1.2.4.203", ["htj2k", "image/jphc"]], ["1.2.840.10008.1.2.4.80", ["jls", "image/jls"]],
]);

/** One decoding worker per codec, started at its first frame. */
class Decoders {
  constructor(base) { this.base = base; this.workers = new Map(); this.waiting = new Map(); this.next = 0; this.ready = new Set(); this.decoded = 0; }

  /** The codec's WebAssembly is compiled: frames may come as stored. Until then (the first
   * image, on a fast link) they come decoded by the server rather than wait for it. */
  isReady(codec) { this.worker(codec); return this.ready.has(codec); }

  /** Start a codec's worker now (it compiles its WebAssembly while the page asks for the
   * study list and the first metadata, instead of after the first frame arrived). */
  warm(codec) { this.worker(codec).postMessage({ warm: true }); }

  decode(codec, bytes) {
    const worker = this.worker(codec);
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      worker.postMessage({ id, bytes }, [bytes.buffer]);
    });
  }

  worker(codec) {
    let worker = this.workers.get(codec);
    if (!worker) {
      worker = new Worker(new URL(`decoder.js?codec=${codec}`, this.base));
      worker.onmessage = ({ data }) => {
        if (data.ready) { this.ready.add(codec); return; }
        const pending = this.waiting.get(data.id);
        this.waiting.delete(data.id);
        if (!pending) return;
        if (data.error) { pending.reject(new Error(`${codec}: ${data.error}`)); return; }
        this.decoded += 1;
        pending.resolve(data.bytes);
      };
      this.workers.set(codec, worker);
    }
    return worker;
  }
}

export class DicomWeb {
  constructor(root) { this.root = root; this.decoders = new Decoders(import.meta.url); this.bytes = 0; }

  async json(path) {
    const response = await fetch(this.root + path, {
      headers: { Accept: "application/dicom+json" }, credentials: "same-origin",
    });
    if (!response.ok) throw this.failed(response, path);
    return response.json();
  }

  /** The error of a failed request; a 401 also says that the viewer session ended. */
  failed(response, what) {
    if (response.status === 401) window.dispatchEvent(new CustomEvent("dgw-session-ended"));
    return new Error(`${response.status} ${what}`);
  }

  /** Native (uncompressed, little endian) bytes of one frame: a grayscale frame stored as
   * HTJ2K or JPEG-LS travels as stored and is decoded in a worker; any other, or one the
   * server will not send as stored, is decoded by the server. */
  async frame(study, series, sop, number, syntax, grayscale) {
    const path = `/studies/${study}/series/${series}/instances/${sop}/frames/${number}`;
    let stored = grayscale && typeof Worker !== "undefined" ? BROWSER_DECODED.get(syntax) : undefined;
    if (stored && !this.decoders.ready.has(stored[0])) stored = undefined;
    if (stored) {
      const response = await this.fetchFrame(path, `multipart/related; type="${stored[1]}"`);
      if (response.ok) return this.decoders.decode(stored[0], await this.body(response));
      if (response.status !== 406) throw this.failed(response, `frame ${number}`);
    }
    const response = await this.fetchFrame(path, 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1');
    if (!response.ok) throw this.failed(response, `frame ${number}`);
    return this.body(response);
  }

  /** The bytes of a bulk data element of the metadata (its BulkDataURI, or inline). */
  async bulk(element) {
    if (element.InlineBinary) return Uint8Array.from(atob(element.InlineBinary), (c) => c.charCodeAt(0));
    const uri = String(element.BulkDataURI || "");
    const response = await fetch(/^https?:/.test(uri) ? uri : `${this.root}/${uri.replace(/^\/+/, "")}`, {
      headers: { Accept: "multipart/related; type=\"application/octet-stream\"" }, credentials: "same-origin" });
    if (!response.ok) throw this.failed(response, "bulk data");
    return this.body(response);
  }

  /** Start the browser's decoder of frames stored with `syntax`, if it has one. */
  warmDecoder(syntax) {
    const stored = BROWSER_DECODED.get(syntax);
    if (stored && typeof Worker !== "undefined") this.decoders.warm(stored[0]);
  }

  fetchFrame(path, accept) {
    return fetch(this.root + path, { headers: { Accept: accept }, credentials: "same-origin" });
  }

  async body(response) {
    const type = response.headers.get("content-type") || "";
    const body = new Uint8Array(await response.arrayBuffer());
    this.bytes += body.length;
    const match = /boundary="?([^";]+)"?/i.exec(type);
    return match ? firstPart(body, match[1]).slice() : body;
  }

  thumbnail(study, series) { return `${this.root}/studies/${study}/series/${series}/thumbnail`; }
}

/** The body of the first part of a multipart/related answer. */
function firstPart(body, boundary) {
  const encoder = new TextEncoder();
  const start = indexOf(body, encoder.encode("\r\n\r\n"), indexOf(body, encoder.encode("--" + boundary), 0));
  const end = indexOf(body, encoder.encode("\r\n--" + boundary), start + 4);
  return body.subarray(start + 4, end < 0 ? body.length : end);
}

function indexOf(haystack, needle, from) {
  outer: for (let i = Math.max(0, from); i <= haystack.length - needle.length; i++) {
    for (let j = 0; j < needle.length; j++) if (haystack[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

/** What the renderer needs of one instance, from its DICOM JSON (metadata or QIDO). */
export function imageInfo(item, availableSyntax) {
  const photometric = String(value(item, "00280004") || "MONOCHROME2").trim();
  const samples = Number(value(item, "00280002") || 1);
  const stored = availableSyntax || value(item, "00083002");
  // The server decodes compressed colour frames to RGB, interleaved (pydicom's default).
  const decodedToRgb = samples === 3 && stored && !COMPRESSED_SYNTAXES_NATIVE.has(stored);
  const centers = values(item, "00281050").map(Number);
  const widths = values(item, "00281051").map(Number);
  return {
    rows: Number(value(item, "00280010")), columns: Number(value(item, "00280011")),
    bitsAllocated: Number(value(item, "00280100") || 16), bitsStored: Number(value(item, "00280101") || value(item, "00280100") || 16),
    signed: Number(value(item, "00280103") || 0) === 1, samples,
    photometric: decodedToRgb ? "RGB" : photometric,
    planar: decodedToRgb ? 0 : Number(value(item, "00280006") || 0),
    slope: Number(value(item, "00281053") ?? 1) || 1, intercept: Number(value(item, "00281052") ?? 0) || 0,
    center: centers.length ? centers[0] : undefined, width: widths.length ? widths[0] : undefined,
    voiFunction: String(value(item, "00281056") || "LINEAR").trim(),
    voiLut: voiLut(item),
    frames: Number(value(item, "00280008") || 1),
    instanceNumber: Number(value(item, "00200013") || 0),
    position: values(item, "00200032").map(Number),
    orientation: values(item, "00200037").map(Number),
    sliceLocation: value(item, "00201041"),
    sliceThickness: value(item, "00180050"),
    pixelSpacing: values(item, "00280030").map(Number),
    palette: photometric === "PALETTE COLOR" ? paletteOf(item) : null,
    frameRate: Number(value(item, "00082144") || value(item, "00180040") || 0),
    frameTime: Number(value(item, "00181063") || 0),
  };
}

/** `info` for frame `frame` (1-based) of an enhanced multi-frame instance: what its shared
 * and per-frame functional groups say of the window, the rescale, the plane's position and
 * orientation and the pixel spacing (PS3.3 C.7.6.16) replaces the instance-level values. */
export function frameInfo(info, item, frame) {
  const shared = values(item, "52009229")[0];
  const perFrame = values(item, "52009230")[frame - 1];
  if (!shared && !perFrame) return info;
  const group = (tag) => values(perFrame, tag)[0] || values(shared, tag)[0];
  const out = { ...info };
  const voi = group("00289132");
  if (voi && values(voi, "00281050").length && values(voi, "00281051").length) {
    out.center = Number(values(voi, "00281050")[0]); out.width = Number(values(voi, "00281051")[0]);
    out.voiFunction = String(value(voi, "00281056") || out.voiFunction).trim();
  }
  const rescale = group("00289145");
  if (rescale) {
    out.slope = Number(value(rescale, "00281053") ?? out.slope) || 1;
    out.intercept = Number(value(rescale, "00281052") ?? out.intercept) || 0;
  }
  const position = group("00209113");
  if (position && values(position, "00200032").length === 3) out.position = values(position, "00200032").map(Number);
  const orientation = group("00209116");
  if (orientation && values(orientation, "00200037").length === 6) out.orientation = values(orientation, "00200037").map(Number);
  const measures = group("00289110");
  if (measures) {
    if (values(measures, "00280030").length === 2) out.pixelSpacing = values(measures, "00280030").map(Number);
    if (value(measures, "00180050") !== undefined) out.sliceThickness = value(measures, "00180050");
  }
  return out;
}

/** The patient directions of the four edges of an image (PS3.3 C.7.6.1.1.1), from Image
 * Orientation (Patient): {left, right, top, bottom}, e.g. "R", "L", "A", "P"; null without. */
export function orientationMarkers(orientation, screenRight = [1, 0], screenDown = [0, 1]) {
  if (!orientation || orientation.length !== 6) return null;
  const letters = (vector) => {
    const names = [["L", "R"], ["P", "A"], ["H", "F"]];
    return vector.map((v, axis) => [Math.abs(v), v > 0 ? names[axis][0] : names[axis][1]])
      .filter(([size]) => size > 0.25).sort((a, b) => b[0] - a[0]).map(([, name]) => name).join("");
  };
  // A screen direction (in image columns, rows: after rotation and flips) in patient space.
  const patient = ([c, r]) => {
    const v = [0, 1, 2].map((axis) => c * orientation[axis] + r * orientation[axis + 3]);
    const size = Math.hypot(...v) || 1;
    return v.map((x) => x / size);
  };
  const right = patient(screenRight), down = patient(screenDown);
  const opposite = (vector) => vector.map((v) => -v);
  return { right: letters(right), left: letters(opposite(right)), bottom: letters(down), top: letters(opposite(down)) };
}

/** The red, green and blue lookup tables of a PALETTE COLOR image, each scaled to 0-255
 * ({first, entries, red, green, blue}), or null when they are not in the JSON inline. */
export function paletteOf(item) {
  const descriptor = values(item, "00281101").map(Number);
  if (descriptor.length !== 3) return null;
  const entries = descriptor[0] || 65536, first = descriptor[1], bits = descriptor[2];
  const table = (tag) => {
    const data = item[tag];
    if (!data || !data.InlineBinary) return null;
    const raw = Uint8Array.from(atob(data.InlineBinary), (c) => c.charCodeAt(0));
    const words = bits > 8 ? new Uint16Array(raw.buffer, 0, raw.length >> 1) : raw;
    const scale = bits > 8 ? 1 / 257 : 1;
    return Uint8ClampedArray.from(words.subarray(0, entries), (v) => v * scale);
  };
  const [red, green, blue] = ["00281201", "00281202", "00281203"].map(table);
  return red && green && blue ? { first, entries, red, green, blue } : null;
}

function voiLut(item) {
  const sequence = values(item, "00283010");
  if (!sequence.length) return null;
  const first = sequence[0];
  const descriptor = values(first, "00283002").map(Number);
  const data = first["00283006"];
  if (descriptor.length !== 3 || !data) return null;
  let table = null;
  if (data.Value) table = Int32Array.from(data.Value.map(Number));
  else if (data.InlineBinary) {
    const raw = Uint8Array.from(atob(data.InlineBinary), (c) => c.charCodeAt(0));
    table = descriptor[2] > 8 ? new Uint16Array(raw.buffer, 0, raw.length >> 1) : raw;
  }
  if (!table) return null;
  return { entries: descriptor[0] || 65536, first: descriptor[1], bits: descriptor[2], table };
}

/** Stored pixel values of a frame as a typed array (grayscale) or bytes (colour). */
export function pixels(info, bytes) {
  if (info.samples === 3) return bytes;
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  let data;
  if (info.bitsAllocated === 8) data = info.signed ? new Int8Array(buffer) : new Uint8Array(buffer);
  else if (info.bitsAllocated === 16) data = info.signed ? new Int16Array(buffer, 0, buffer.byteLength >> 1) : new Uint16Array(buffer, 0, buffer.byteLength >> 1);
  else if (info.bitsAllocated === 32) data = info.signed ? new Int32Array(buffer, 0, buffer.byteLength >> 2) : new Uint32Array(buffer, 0, buffer.byteLength >> 2);
  else throw new Error(`BitsAllocated ${info.bitsAllocated} is not supported`);
  if (info.bitsStored < info.bitsAllocated && info.bitsAllocated <= 16) {
    // Keep only the stored bits (sign-extended when signed): high bits may carry overlays.
    // In place, in the frame's own 8 or 16 bits: a 512x512 slice stays 512 KB.
    const shift = 32 - info.bitsStored, mask = (1 << info.bitsStored) - 1;
    if (info.signed) for (let i = 0; i < data.length; i++) data[i] = (data[i] << shift) >> shift;
    else for (let i = 0; i < data.length; i++) data[i] &= mask;
  }
  return data;
}

export function range(data) {
  let min = Infinity, max = -Infinity;
  for (let i = 0; i < data.length; i++) { const v = data[i]; if (v < min) min = v; if (v > max) max = v; }
  return [min, max];
}

/** A window from the data when the data set has none: the full range of modality values. */
export function defaultWindow(info, stats) {
  if (info.center !== undefined && info.width !== undefined && info.width > 0) return [info.center, info.width];
  const low = stats[0] * info.slope + info.intercept, high = stats[1] * info.slope + info.intercept;
  return [(low + high) / 2, Math.max(1, high - low)];
}

/** Paint one frame into `image` (ImageData of the frame's size): modality LUT (rescale),
 * VOI (window, VOI LUT, function), presentation (MONOCHROME1, invert). */
export function paint(image, info, data, stats, window, invert, useVoiLut) {
  const out = image.data;
  if (info.samples === 3) return paintColour(out, info, data, invert);
  if (info.palette) return paintPalette(out, info.palette, data, invert);
  const [center, width] = window;
  const [min, max] = stats;
  const size = max - min + 1;
  const lut = new Uint8ClampedArray(size);
  const flip = (info.photometric === "MONOCHROME1") !== invert;
  const voi = useVoiLut ? info.voiLut : null;
  for (let i = 0; i < size; i++) {
    const stored = min + i;
    let y;
    if (voi) {
      const index = Math.min(voi.entries - 1, Math.max(0, stored - voi.first));
      y = (voi.table[index] / ((1 << voi.bits) - 1)) * 255;
    } else {
      const x = stored * info.slope + info.intercept;
      y = voiValue(x, center, width, info.voiFunction);
    }
    lut[i] = flip ? 255 - y : y;
  }
  for (let p = 0, q = 0; p < data.length; p++, q += 4) {
    const y = lut[data[p] - min];
    out[q] = y; out[q + 1] = y; out[q + 2] = y; out[q + 3] = 255;
  }
}

function voiValue(x, c, w, fn) {
  if (fn === "SIGMOID") return 255 / (1 + Math.exp(-4 * (x - c) / w));
  if (fn === "LINEAR_EXACT") {
    if (x <= c - w / 2) return 0;
    if (x > c + w / 2) return 255;
    return ((x - c) / w + 0.5) * 255;
  }
  // PS3.3 C.11.2.1.2.1
  if (x <= c - 0.5 - (w - 1) / 2) return 0;
  if (x > c - 0.5 + (w - 1) / 2) return 255;
  return ((x - (c - 0.5)) / (w - 1) + 0.5) * 255;
}

function paintPalette(out, palette, data, invert) {
  const { first, entries, red, green, blue } = palette;
  for (let p = 0, q = 0; p < data.length; p++, q += 4) {
    const index = Math.min(entries - 1, Math.max(0, data[p] - first));
    out[q] = invert ? 255 - red[index] : red[index];
    out[q + 1] = invert ? 255 - green[index] : green[index];
    out[q + 2] = invert ? 255 - blue[index] : blue[index];
    out[q + 3] = 255;
  }
}

function paintColour(out, info, data, invert) {
  const n = info.rows * info.columns;
  const ybr = info.photometric.startsWith("YBR_FULL");
  for (let p = 0; p < n; p++) {
    let r, g, b;
    if (info.planar === 1) { r = data[p]; g = data[p + n]; b = data[p + 2 * n]; }
    else { r = data[3 * p]; g = data[3 * p + 1]; b = data[3 * p + 2]; }
    if (ybr) {
      const y = r, cb = g - 128, cr = b - 128;
      r = y + 1.402 * cr; g = y - 0.344136 * cb - 0.714136 * cr; b = y + 1.772 * cb;
    }
    const q = 4 * p;
    out[q] = invert ? 255 - r : r; out[q + 1] = invert ? 255 - g : g; out[q + 2] = invert ? 255 - b : b; out[q + 3] = 255;
  }
}
