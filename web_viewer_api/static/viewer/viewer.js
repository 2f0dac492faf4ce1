// The share viewer: study browser, stack viewports with W/L, zoom/pan, cine, 1x1 / 1x2.
// Plain ES modules served as static files: no build step, nothing fetched from elsewhere.
import { keepContextKey, openContext } from "./context.js";
import { angle, ellipseStats, length, probe, scaleBarMm } from "./measure.js";
import { drawPresentation, presentationOf } from "./presentation.js";
import { DicomWeb, defaultWindow, frameInfo, imageInfo, orientationMarkers, paint, pixels, range, value, values } from "./dicom.js";

const TEXT = {
  fr: {
    studies: "Examens", series: "séries", images: "images", download: "Télécharger (ZIP)",
    layout1: "1 vue", layout2: "2 vues", presets: "Préréglages", dataset: "Fenêtre de l'examen",
    lung: "Poumon", mediastinum: "Médiastin", bone: "Os", brain: "Cerveau", abdomen: "Abdomen",
    invert: "Inverser", reset: "Réinitialiser", play: "Ciné", help: "Aide", tool: "Outil",
    toolWl: "Fenêtrage", toolPan: "Déplacer", toolZoom: "Zoom", close: "Fermer",
    validUntil: "Valable jusqu'au", note: "Message de l'expéditeur", empty: "Choisissez une série",
    loadError: "Impossible de charger les images", language: "English", im: "Im", zoom: "Zoom",
    keys: [["↑ ↓ / molette", "image précédente / suivante"], ["Page ↑ ↓", "10 images"],
      ["Début / Fin", "première / dernière image"], ["glisser (gauche)", "outil actif (fenêtrage par défaut)"],
      ["glisser (droit)", "zoom"], ["glisser (milieu) / Maj + glisser", "déplacer"],
      ["1 … 5", "préréglages de fenêtrage"], ["0", "fenêtre de l'examen"], ["I", "inverser"],
      ["R", "réinitialiser"], ["Espace", "ciné"], ["Tab", "vue suivante (2 vues)"], ["?", "cette aide"]],
    touches: [["1 doigt", "outil actif (défilement par défaut)"], ["2 doigts : pincer", "zoom"],
      ["2 doigts : glisser", "déplacer"], ["double toucher", "taille d'origine"]],
    fps: "Vitesse du ciné", fpsAuto: "i/s : examen",
    toolScroll: "Défiler", toolLength: "Longueur", toolAngle: "Angle", toolRoi: "ROI (ellipse)", toolProbe: "Valeur du pixel",
    rotate: "Pivoter 90°", flipH: "Miroir ↔", flipV: "Miroir ↕", fullscreen: "Plein écran", exportPng: "Exporter (PNG)",
    clear: "Effacer les mesures", sync: "Synchroniser", mean: "moy.", sd: "é-t", area: "aire",
    viewport: "Vue", loading: "Chargement", image: "image", uses: "Ouvertures", colon: " : ",
    sessionEnded: "Votre session de lecture a pris fin après un temps d'inactivité. Rouvrez-la : le code PIN est redemandé, aucune ouverture n'est décomptée.",
    reopen: "Rouvrir",
    patient: "Patient", sex: { F: "F", M: "M", O: "autre" },
    patients: (n) => `Ce partage concerne ${n} patients : vérifiez chaque identité avant de lire.`,
    datesShifted: "Dates décalées pour la confidentialité (les intervalles entre examens sont exacts)",
    shifted: "dates décalées",
    context: "Contexte transmis par le site", contextNoKey: "Ce partage porte un contexte chiffré par le site producteur : ouvrez le lien complet reçu du site pour le lire.",
    contextBad: "Le contexte chiffré n'a pas pu être lu (clé absente ou erronée).",
    contextInsecure: "Le contexte chiffré ne se lit qu'en HTTPS.",
    fields: { patient_name: "Nom", patient_birth_date: "Date de naissance", patient_id: "Identifiant", exam_date: "Date réelle de l'examen", clinical_question: "Question clinique", comment: "Commentaire" },
    openDocument: "Enregistrer le document", report: "Compte rendu", cited: "image citée", keyImages: "Images clés", segments: "Segments",
    notImage: (what) => `Cette série contient ${what}, sans image à afficher.`,
    kinds: { SR: "un compte rendu structuré", KO: "une sélection d'images clés", PR: "un état de présentation", SEG: "une segmentation", DOC: "un document", OT: "un objet non image" },
    withheld: "Une partie de cet examen n'a pas été transmise par le site producteur :",
    withheldWhy: { pixels_may_identify: "leurs pixels peuvent montrer l'identité du patient (texte incrusté)", too_large: "taille au-delà de la limite de la passerelle", not_deidentifiable: "illisibles ou impossibles à désidentifier sans risque" },
    askSite: "Demandez-les au site producteur.",
  },
  en: {
    studies: "Studies", series: "series", images: "images", download: "Download (ZIP)",
    layout1: "1 view", layout2: "2 views", presets: "Window", dataset: "Dataset window",
    lung: "Lung", mediastinum: "Mediastinum", bone: "Bone", brain: "Brain", abdomen: "Abdomen",
    invert: "Invert", reset: "Reset", play: "Cine", help: "Help", tool: "Tool",
    toolWl: "Window/level", toolPan: "Pan", toolZoom: "Zoom", close: "Close",
    validUntil: "Valid until", note: "Sender's note", empty: "Choose a series",
    loadError: "The images could not be loaded", language: "Français", im: "Im", zoom: "Zoom",
    keys: [["↑ ↓ / wheel", "previous / next image"], ["Page ↑ ↓", "10 images"],
      ["Home / End", "first / last image"], ["drag (left)", "active tool (window/level by default)"],
      ["drag (right)", "zoom"], ["drag (middle) / Shift + drag", "pan"],
      ["1 … 5", "window presets"], ["0", "dataset window"], ["I", "invert"],
      ["R", "reset"], ["Space", "cine"], ["Tab", "next view (2 views)"], ["?", "this help"]],
    touches: [["1 finger", "active tool (scrolling by default)"], ["2 fingers: pinch", "zoom"],
      ["2 fingers: drag", "pan"], ["double tap", "original size"]],
    fps: "Cine rate", fpsAuto: "fps: data set",
    toolScroll: "Scroll", toolLength: "Length", toolAngle: "Angle", toolRoi: "ROI (ellipse)", toolProbe: "Pixel value",
    rotate: "Rotate 90°", flipH: "Flip ↔", flipV: "Flip ↕", fullscreen: "Full screen", exportPng: "Export (PNG)",
    clear: "Clear measurements", sync: "Synchronise", mean: "mean", sd: "SD", area: "area",
    viewport: "View", loading: "Loading", image: "image", uses: "Uses", colon: ": ",
    sessionEnded: "Your reading session ended after a while without activity. Reopen it: the PIN is asked again, no use is counted.",
    reopen: "Reopen",
    patient: "Patient", sex: { F: "F", M: "M", O: "other" },
    patients: (n) => `This share covers ${n} patients: check each identity before reading.`,
    datesShifted: "Dates shifted for privacy (intervals between studies are exact)",
    shifted: "dates shifted",
    context: "Context sent by the site", contextNoKey: "This share carries a context sealed by the sending site: open the full link you received from the site to read it.",
    contextBad: "The sealed context could not be read (missing or wrong key).",
    contextInsecure: "The sealed context can only be read over HTTPS.",
    fields: { patient_name: "Name", patient_birth_date: "Birth date", patient_id: "Identifier", exam_date: "Real exam date", clinical_question: "Clinical question", comment: "Comment" },
    openDocument: "Save the document", report: "Report", cited: "cited image", keyImages: "Key images", segments: "Segments",
    notImage: (what) => `This series holds ${what}, with no image to show.`,
    kinds: { SR: "a structured report", KO: "a key object selection", PR: "a presentation state", SEG: "a segmentation", DOC: "a document", OT: "a non-image object" },
    withheld: "Part of this study was not sent by the producing site:",
    withheldWhy: { pixels_may_identify: "their pixels may show the patient's identity (burned-in text)", too_large: "larger than the gateway accepts", not_deidentifiable: "unreadable, or not safely de-identifiable" },
    askSite: "Ask the producing site for them.",
  },
};
const PRESETS = [["lung", -600, 1500], ["mediastinum", 50, 350], ["bone", 400, 1800], ["brain", 40, 80], ["abdomen", 50, 400]];
// Background frame requests at once: browsers open 6 connections per host over HTTP/1.1,
// so 2 stay free for the image on screen, which also pauses the prefetch until it is shown.
const PREFETCH_CONCURRENCY = 4;
const READER_PAUSE_MS = 250;  // the prefetch resumes this long after the reader's last step

/** Decoded frames of every view, by instance and frame, least recently used out first:
 * a second view of a series downloads nothing again. */
class FrameCache {
  constructor(limitBytes) { this.limit = limitBytes; this.bytes = 0; this.frames = new Map(); }
  get(key) {
    const found = this.frames.get(key);
    if (found) { this.frames.delete(key); this.frames.set(key, found); }
    return found;
  }
  has(key) { return this.frames.has(key); }
  set(key, loaded) {
    this.frames.set(key, loaded);
    this.bytes += loaded.data.byteLength;
    for (const [oldest, frame] of this.frames) {
      if (this.bytes <= this.limit || oldest === key) break;
      this.frames.delete(oldest);
      this.bytes -= frame.data.byteLength;
    }
  }
}
// A quarter of the device's memory when the browser says it (Chrome), else 1 GB.
const CACHE_BYTES = Math.min(1 << 30, (navigator.deviceMemory || 4) * (1 << 28));
const SERIES_PAGE = 1000;  // QIDO-RS answers at most this many rows: longer series are paged

const MEASURING = new Set(["length", "angle", "roi", "probe"]);

/** Series modalities without images: their tiles have no thumbnail to ask for. */
const NON_IMAGE_MODALITIES = new Set(["SR", "KO", "PR", "SEG", "DOC", "RTSTRUCT", "RTPLAN"]);

/** What a series holds when it is not images to stack (null: images). */
function nonImageKind(sopClass, metadata) {
  const uid = String(sopClass || "");
  if (uid === "1.2.840.10008.5.1.4.1.1.88.59") return "KO";
  if (uid.startsWith("1.2.840.10008.5.1.4.1.1.88.")) return "SR";
  if (uid.startsWith("1.2.840.10008.5.1.4.1.1.11.")) return "PR";
  if (uid === "1.2.840.10008.5.1.4.1.1.66.4") return "SEG";
  if (uid.startsWith("1.2.840.10008.5.1.4.1.1.104.")) return "DOC";
  if (!value(metadata, "00280010")) return "OT";
  return null;
}

/** A SEG frame's bytes as one byte per pixel (1: in the segment): binary frames are packed
 * 8 pixels a byte, least significant bit first (PS3.5 8.1.1). */
function maskOf(bytes, segmentation) {
  const size = segmentation.rows * segmentation.columns;
  const mask = new Uint8Array(size);
  if (segmentation.bitsAllocated === 1) for (let p = 0; p < size; p++) mask[p] = (bytes[p >> 3] >> (p & 7)) & 1;
  else for (let p = 0; p < size; p++) mask[p] = bytes[p] ? 1 : 0;
  return mask;
}

/** What the share allows beyond viewing (data-permissions: access.Permission names). */
function permitted(data, permission) { return (data.permissions || "").split(" ").includes(permission); }
function countOf(t, n) { return `${n} ${n === 1 ? t.image : t.images}`; }
function codeMeaning(item, tag) { return value(values(item, tag)[0], "00080104") || ""; }

const timings = { start: performance.now(), asked: [], painted: [] };
window.dgwViewer = { timings, errors: [] };

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, val] of Object.entries(attributes)) {
    if (name === "text") node.textContent = val;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), val);
    else if (val !== undefined && val !== null && val !== false) node.setAttribute(name, val === true ? "" : val);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function formatDate(text) {
  return text && text.length === 8 ? `${text.slice(0, 4)}-${text.slice(4, 6)}-${text.slice(6)}` : "";
}

/** One series as a stack of frames, loaded lazily and prefetched in the background. */
class Stack {
  constructor(api, study, series, onProgress, cache) {
    this.api = api; this.study = study; this.series = series; this.onProgress = onProgress;
    this.frames = []; // {sop, frame, info}
    this.cache = cache; // shared by the views: "sop/frame" -> {data, stats}
    this.pending = new Map();
    this.loaded = 0;
    this.cancelled = false;
    this.foreground = null;  // the request of the image on screen, while it runs
    this.movedAt = -Infinity;  // when the reader last changed image
    this.prefetched = new Set();
  }

  async open() {
    const instances = [];
    for (let offset = 0; ; offset += SERIES_PAGE) {
      const page = await this.api.json(`/studies/${this.study}/series/${this.series}/instances?limit=${SERIES_PAGE}&offset=${offset}`);
      instances.push(...page);
      if (page.length < SERIES_PAGE) break;
    }
    instances.sort((a, b) => (Number(value(a, "00200013")) || 0) - (Number(value(b, "00200013")) || 0));
    const first = instances[0];
    if (!first) throw new Error("empty series");
    const sop = value(first, "00080018");
    const [metadata] = await this.api.json(`/studies/${this.study}/series/${this.series}/instances/${sop}/metadata`);
    const kind = nonImageKind(value(first, "00080016"), metadata);
    if (kind) throw Object.assign(new Error(`not an image series (${kind})`), { kind, metadata });
    this.datesShifted = value(metadata, "00280303") === "MODIFIED";
    const firstInfo = imageInfo(metadata, value(first, "00083002"));
    this.syntaxes = new Map(instances.map((i) => [value(i, "00080018"), value(i, "00083002")]));
    for (const instance of instances) {
      const uid = value(instance, "00080018");
      const count = Number(value(instance, "00280008") || 1);
      const info = uid === sop ? firstInfo : { ...firstInfo, instanceNumber: Number(value(instance, "00200013") || 0), provisional: true };
      for (let frame = 1; frame <= count; frame++) {
        this.frames.push({ sop: uid, frame, info: uid === sop ? frameInfo(info, metadata, frame) : info });
      }
    }
    this.refineLater();
    return this;
  }

  /** The whole series' metadata, in the background: exact per-instance parameters and the
   * geometric order (along the slice normal) replace the provisional ones. */
  async refineLater() {
    try {
      const documents = await this.api.json(`/studies/${this.study}/series/${this.series}/metadata`);
      const byUid = new Map(documents.map((d) => [value(d, "00080018"), d]));
      for (const entry of this.frames) {
        const document = byUid.get(entry.sop);
        if (document) entry.info = frameInfo(imageInfo(document, this.syntaxes.get(entry.sop)), document, entry.frame);
      }
      const normal = sliceNormal(this.frames[0] && this.frames[0].info.orientation);
      if (normal && this.frames.every((f) => f.info.position.length === 3 && f.info.frames === 1)) {
        const current = this.frames[this.viewIndex ? this.viewIndex() : 0];
        this.frames.sort((a, b) => dot(a.info.position, normal) - dot(b.info.position, normal));
        // Keep the direction of the instance numbers (head to feet when the modality numbered so).
        const ends = [this.frames[0].info.instanceNumber, this.frames[this.frames.length - 1].info.instanceNumber];
        if (ends[0] > ends[1]) this.frames.reverse();
        if (this.onReorder) this.onReorder(current ? this.frames.indexOf(current) : 0);
      }
      if (this.onRefined) this.onRefined();
    } catch (error) {
      window.dgwViewer.errors.push(String(error));
    }
  }

  /** The pixels of frame `index` (cached by instance and frame: safe across reordering);
   * `foreground`: the image on screen, before any prefetch. */
  async get(index, foreground = false) {
    const entry = this.frames[index];
    const key = entry.sop + "/" + entry.frame;
    const cached = this.cache.get(key);
    if (cached) return cached;
    if (this.pending.has(key)) return this.pending.get(key);
    const promise = this.api.frame(this.study, this.series, entry.sop, entry.frame,
      this.syntaxes.get(entry.sop), entry.info.samples === 1).then((bytes) => {
      const data = pixels(entry.info, bytes);
      const loaded = { data, stats: entry.info.samples === 3 ? [0, 255] : range(data) };
      this.cache.set(key, loaded);
      this.pending.delete(key);
      this.loaded += 1;
      if (this.onProgress) this.onProgress(this.loaded, this.frames.length);
      return loaded;
    }, (error) => { this.pending.delete(key); throw error; });
    this.pending.set(key, promise);
    if (foreground) {
      this.foreground = promise;
      const done = () => { if (this.foreground === promise) this.foreground = null; };
      promise.then(done, done);
    }
    return promise;
  }

  /** The frame to fetch next: the nearest not yet asked for to the image on screen now
   * (ahead first), so the prefetch follows the reader. -1 when all were asked for. */
  nextToPrefetch() {
    const at = this.viewIndex ? this.viewIndex() : 0;
    for (let distance = 0; distance < this.frames.length; distance++) {
      for (const index of [at + distance, at - distance - 1]) {
        if (index >= 0 && index < this.frames.length && !this.prefetched.has(index)) return index;
      }
    }
    return -1;
  }

  /** Fetch every frame, a few at a time, nearest to the image on screen first. It waits
   * while the image on screen is being fetched and while the reader is moving through the
   * stack (the link is then the reader's: on a slow one, a prefetch started now would
   * share it with the image they are waiting for). */
  async prefetch() {
    const worker = async () => {
      while (!this.cancelled) {
        for (;;) {
          const still = READER_PAUSE_MS - (performance.now() - this.movedAt);
          if (this.foreground) await this.foreground.catch(() => {});
          else if (still > 0) await new Promise((resolve) => setTimeout(resolve, still));
          else break;
        }
        const index = this.nextToPrefetch();
        if (index < 0) return;
        this.prefetched.add(index);
        try { await this.get(index); } catch (error) { window.dgwViewer.errors.push(String(error)); }
      }
    };
    await Promise.all(Array.from({ length: PREFETCH_CONCURRENCY }, worker));
    if (!this.cancelled && this.loaded >= this.frames.length) {
      timings.seriesLoaded = performance.now() - timings.start;
      timings.seriesLoadedSinceNavigation = performance.now();
      window.dgwViewer.seriesLoaded = (window.dgwViewer.seriesLoaded || 0) + 1;
    }
  }
}

function sliceNormal(orientation) {
  if (!orientation || orientation.length !== 6) return null;
  const [a, b, c, d, e, f] = orientation;
  return [b * f - c * e, c * d - a * f, a * e - b * d];
}
function dot(p, n) { return p[0] * n[0] + p[1] * n[1] + p[2] * n[2]; }

const SEGMENT_COLOURS = [[255, 80, 80], [80, 200, 255], [120, 255, 120], [255, 200, 60], [220, 120, 255], [255, 140, 200]];

/** CIELab (DICOM's 16-bit scaled values) to sRGB 0-255. */
function labToRgb([l16, a16, b16]) {
  const l = (l16 / 65535) * 100, a = (a16 / 65535) * 255 - 128, b = (b16 / 65535) * 255 - 128;
  const fy = (l + 16) / 116, fx = fy + a / 500, fz = fy - b / 200;
  const f = (t) => (t ** 3 > 0.008856 ? t ** 3 : (t - 16 / 116) / 7.787);
  const [x, y, z] = [0.95047 * f(fx), f(fy), 1.08883 * f(fz)];
  const linear = [3.2406 * x - 1.5372 * y - 0.4986 * z, -0.9689 * x + 1.8758 * y + 0.0415 * z, 0.0557 * x - 0.204 * y + 1.057 * z];
  return linear.map((c) => Math.round(255 * Math.min(1, Math.max(0, c > 0.0031308 ? 1.055 * c ** (1 / 2.4) - 0.055 : 12.92 * c))));
}

/** A SEG instance (PS3.3 A.51) as what the viewport draws: its segments and, by source
 * instance, the SEG frames (with their segment) that lie over it. */
function segmentationOf(metadata, study, series, sop, syntax) {
  const segments = new Map(values(metadata, "00620002").map((segment, k) => {
    const lab = values(segment, "0062000D").map(Number);
    return [Number(value(segment, "00620004")), { label: value(segment, "00620005") || `#${k + 1}`,
      rgb: lab.length === 3 ? labToRgb(lab) : SEGMENT_COLOURS[k % SEGMENT_COLOURS.length] }];
  }));
  const shared = values(metadata, "52009229")[0];
  const bySource = new Map();
  values(metadata, "52009230").forEach((frame, k) => {
    const group = (tag) => values(frame, tag)[0] || values(shared, tag)[0];
    const segment = Number(value(group("0062000A"), "0062000B") || 1);
    for (const derivation of values(frame, "00089124")) {
      for (const source of values(derivation, "00082112")) {
        const uid = value(source, "00081155");
        if (!bySource.has(uid)) bySource.set(uid, []);
        bySource.get(uid).push({ frame: k + 1, segment });
      }
    }
  });
  return { study, series, sop, syntax, segments, bySource, masks: new Map(),
    rows: Number(value(metadata, "00280010")), columns: Number(value(metadata, "00280011")),
    bitsAllocated: Number(value(metadata, "00280100") || 8) };
}

/** An SR content tree (PS3.3 C.17.3) as nested lists: concept name, then its value. */
function reportTree(items, t, cite) {
  return el("ul", { class: "report" }, ...items.map((item) => {
    const type = value(item, "0040A040");
    const name = codeMeaning(item, "0040A043");
    const parts = [];
    if (type === "TEXT") parts.push(el("span", { class: "text", text: value(item, "0040A160") || "" }));
    else if (type === "NUM") {
      const measured = values(item, "0040A300")[0];
      const unit = values(measured, "004008EA")[0];
      parts.push(document.createTextNode(`${value(measured, "0040A30A") ?? ""} ${value(unit, "00080100") || ""}`));
    } else if (type === "CODE") parts.push(document.createTextNode(codeMeaning(item, "0040A168")));
    else if (type === "DATE" || type === "TIME" || type === "DATETIME")
      parts.push(document.createTextNode(value(item, "0040A121") || value(item, "0040A122") || value(item, "0040A120") || ""));
    else if (type === "PNAME") parts.push(document.createTextNode(value(item, "0040A123") || ""));
    else if (type === "UIDREF") parts.push(document.createTextNode(value(item, "0040A124") || ""));
    else if (type === "IMAGE" || type === "COMPOSITE") {
      for (const reference of values(item, "00081199")) {
        const uid = value(reference, "00081155");
        if (uid) parts.push(el("button", { type: "button", class: "cite", "data-sop": uid, text: t.cited, onclick: () => cite(uid) }));
      }
    }
    const children = values(item, "0040A730");
    return el("li", { "data-type": type || "" }, name ? el("strong", { text: name + (parts.length ? t.colon : "") }) : null,
      ...parts, children.length ? reportTree(children, t, cite) : null);
  }));
}

class Viewport {
  constructor(app, number) {
    this.app = app; this.number = number;
    this.canvas = el("canvas", { tabindex: "0", role: "img", "aria-label": `${app.t.viewport} ${number + 1}` });
    this.overlays = ["tl", "tr", "bl", "br"].map((corner) => el("div", { class: `overlay ${corner}` }));
    this.markers = Object.fromEntries(["left", "right", "top", "bottom"].map((edge) => [edge, el("div", { class: `marker ${edge}` })]));
    this.progress = el("div", { class: "progress" });  // width set through CSSOM (CSP: no inline style)
    this.progress.style.width = "0";
    this.empty = el("div", { class: "empty", text: app.t.empty });
    this.document = el("section", { class: "document", hidden: true });
    this.node = el("div", { class: "viewport" }, this.canvas, ...this.overlays, ...Object.values(this.markers), this.progress, this.empty, this.document);
    this.offscreen = document.createElement("canvas");
    this.stack = null; this.index = 0; this.window = null; this.invert = false; this.useVoiLut = true;
    this.zoom = 1; this.pan = [0, 0]; this.cine = null; this.current = null;
    this.rotation = 0; this.flipH = false; this.flipV = false;
    this.annotations = new Map();  // "sop/frame" -> [{type, points, result}], in image pixels
    this.pendingAngle = null;
    this.bindEvents();
    new ResizeObserver(() => this.draw()).observe(this.node);
  }

  async show(studyUid, seriesUid, seriesItem, focusSop, presentation = null) {
    if (this.stack) this.stack.cancelled = true;
    this.stopCine();
    this.empty.textContent = this.app.t.loading + "…";
    this.empty.hidden = false;
    this.document.hidden = true;
    const stack = new Stack(this.app.api, studyUid, seriesUid, (done, total) => {
      this.progress.style.width = done >= total ? "0" : `${(100 * done) / total}%`;
    }, this.app.cache);
    this.stack = stack; this.seriesItem = seriesItem;
    this.index = 0; this.window = null; this.invert = false; this.zoom = 1; this.pan = [0, 0];
    this.rotation = 0; this.flipH = this.flipV = false; this.pendingAngle = null;
    this.presentation = presentation; this.windowChanged = false;
    if (presentation) {
      this.rotation = presentation.rotation; this.flipH = presentation.flipH; this.invert = presentation.inverse;
    }
    try {
      await stack.open();
    } catch (error) {
      if (this.stack !== stack) return;
      if (error.kind === "PR" && !presentation) {  // a presentation state: its images, as it presents them
        const state = presentationOf(error.metadata);
        const item = ((this.app.seriesOf && this.app.seriesOf.get(studyUid)) || []).find((s) => value(s, "0020000E") === state.series);
        if (item) return this.show(studyUid, state.series, item, state.firstImage, state);
      }
      if (error.kind) {  // a report, key images, a segmentation...: shown as what it is
        this.stack = null; this.current = null; this.draw();
        this.empty.hidden = true;
        this.showDocument(studyUid, error.kind, error.metadata);
        return;
      }
      this.empty.textContent = this.app.t.loadError;
      window.dgwViewer.errors.push(String(error));
      return;
    }
    if (this.stack !== stack) return;
    if (focusSop) this.index = Math.max(0, stack.frames.findIndex((f) => f.sop === focusSop));
    stack.viewIndex = () => this.index;
    stack.onReorder = (index) => { this.index = Math.max(0, index); this.render(); };
    stack.onRefined = () => this.render();
    await this.render();
    this.empty.hidden = true;
    if (timings.firstImage === undefined) {
      timings.firstImage = performance.now() - timings.start;
      timings.firstImageSinceNavigation = performance.now();  // performance.now() counts from navigation
      performance.mark("dgw-first-image");
    }
    this.app.api.warmDecoder(stack.syntaxes.get(stack.frames[0].sop));  // another codec's
    stack.prefetch();
    this.segmentations = [];
    this.app.segmentationsFor(studyUid, seriesUid).then((found) => {
      if (this.stack === stack) { this.segmentations = found; this.draw(); }
    });
  }

  /** The masks of the segmentations over the image on screen (fetched once each). */
  drawSegmentations(context) {
    const sop = this.current.entry.sop;
    const legend = [];
    for (const segmentation of this.segmentations || []) {
      for (const { frame, segment } of segmentation.bySource.get(sop) || []) {
        const drawn = segmentation.segments.get(segment);
        if (drawn && !legend.includes(drawn.label)) legend.push(drawn.label);
        const mask = segmentation.masks.get(frame);
        if (mask === undefined) {
          segmentation.masks.set(frame, null);  // asked for
          this.app.api.frame(segmentation.study, segmentation.series, segmentation.sop, frame, segmentation.syntax, false)
            .then((bytes) => { segmentation.masks.set(frame, maskOf(bytes, segmentation)); this.draw(); },
              (error) => window.dgwViewer.errors.push(String(error)));
          continue;
        }
        if (!mask || !drawn) continue;
        const layer = document.createElement("canvas");
        layer.width = segmentation.columns; layer.height = segmentation.rows;
        const pixels = layer.getContext("2d").createImageData(layer.width, layer.height);
        const [r, g, b] = drawn.rgb;
        for (let p = 0; p < mask.length; p++) {
          if (!mask[p]) continue;
          pixels.data[4 * p] = r; pixels.data[4 * p + 1] = g; pixels.data[4 * p + 2] = b; pixels.data[4 * p + 3] = 110;
        }
        layer.getContext("2d").putImageData(pixels, 0, 0);
        context.setTransform(this.matrix);
        context.drawImage(layer, 0, 0);
        context.setTransform(1, 0, 0, 1, 0, 0);
      }
    }
    this.segmentLegend = legend;
  }

  /** A non-image series: an SR or a key object selection as a readable report (its cited
   * images open on click), a segmentation with its segments; anything else says what it is. */
  showDocument(studyUid, kind, metadata) {
    const t = this.app.t;
    const title = codeMeaning(metadata, "0040A043") || value(metadata, "0008103E") || t.kinds[kind];
    const body = [el("h3", { text: title })];
    if (kind === "SR" || kind === "KO") {
      const cite = (uid) => this.app.openInstance(this, studyUid, uid);
      body.push(reportTree(values(metadata, "0040A730"), t, cite));
    } else if (kind === "SEG") {
      body.push(el("p", { text: t.notImage(t.kinds.SEG) }), el("h4", { text: t.segments }),
        el("ul", {}, ...values(metadata, "00620002").map((segment) =>
          el("li", { text: `${value(segment, "00620004") ?? ""} ${value(segment, "00620005") || ""}`.trim() }))));
    } else if (kind === "DOC" && metadata["00420011"]) {
      // An encapsulated document (PDF, CDA...): its bytes, saved under its own type.
      const type = String(value(metadata, "00420012") || "application/pdf");
      const title = String(value(metadata, "00420010") || "document").replace(/[^\w .-]+/g, "_");
      const save = el("button", { type: "button", class: "document-open", text: t.openDocument,
        onclick: () => this.app.api.bulk(metadata["00420011"]).then((bytes) => {
          const link = el("a", { href: URL.createObjectURL(new Blob([bytes], { type })),
            download: `${title}.${type === "application/pdf" ? "pdf" : type === "text/xml" ? "xml" : "bin"}` });
          document.body.append(link); link.click(); link.remove();
        }, (error) => window.dgwViewer.errors.push(String(error))) });
      body.push(el("p", { text: `${t.notImage(t.kinds.DOC)} (${type})` }), save);
    } else {
      body.push(el("p", { text: t.notImage(t.kinds[kind]) }));
    }
    this.document.replaceChildren(...body);
    this.document.dataset.kind = kind;
    this.document.hidden = false;
  }

  /** Show the current image. One fetch for the screen at a time: a reader holding ↓ sees
   * each image that arrives (progress, even if they have moved on), then the newest they
   * asked for, instead of requests piling up behind each other on a slow link. */
  async render() {
    if (this.rendering) { this.renderAgain = true; return; }
    this.rendering = true;
    try {
      do { this.renderAgain = false; await this.renderOnce(); } while (this.renderAgain);
    } finally {
      this.rendering = false;
    }
  }

  async renderOnce() {
    const stack = this.stack;
    if (!stack || !stack.frames.length) return;
    const index = this.index;
    const entry = stack.frames[index];
    const loaded = await stack.get(index, true);
    if (stack !== this.stack) return;
    if (index !== this.index) this.renderAgain = true;  // painted now, the newest next
    const info = entry.info;
    if (!this.window && this.presentation) {
      const window = this.presentation.windowFor(entry.sop);
      if (window) { this.window = window; this.windowChanged = true; }
    }
    if (!this.window) this.window = defaultWindow(info, loaded.stats);
    this.offscreen.width = info.columns; this.offscreen.height = info.rows;
    const context = this.offscreen.getContext("2d");
    const image = context.createImageData(info.columns, info.rows);
    paint(image, info, loaded.data, loaded.stats, this.window, this.invert, this.useVoiLut && !this.windowChanged);
    context.putImageData(image, 0, 0);
    this.current = { info, entry, loaded };
    this.draw();
    this.canvas.dataset.index = String(index);
    timings.painted.push([index, performance.now()]);  // for the tests and the benchmark
    if (this === this.app.active) this.syncOther();
  }

  draw() {
    if (!this.current) for (const overlay of [...this.overlays, ...Object.values(this.markers)]) overlay.textContent = "";
    const rect = this.node.getBoundingClientRect();
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(rect.width * ratio)), height = Math.max(1, Math.round(rect.height * ratio));
    if (this.canvas.width !== width || this.canvas.height !== height) { this.canvas.width = width; this.canvas.height = height; }
    const context = this.canvas.getContext("2d");
    context.setTransform(1, 0, 0, 1, 0, 0);
    context.fillStyle = "#000"; context.fillRect(0, 0, width, height);
    if (!this.current) return;
    const { info } = this.current;
    this.matrix = this.imageMatrix(info, width, height, ratio);
    context.setTransform(this.matrix);
    context.imageSmoothingEnabled = this.scale * ratio < 1;
    context.drawImage(this.offscreen, 0, 0);
    context.setTransform(1, 0, 0, 1, 0, 0);
    this.drawSegmentations(context);
    if (this.presentation) {
      const screen = ([x, y]) => { const p = this.matrix.transformPoint(new DOMPoint(x, y)); return [p.x, p.y]; };
      drawPresentation(context, this.presentation, this.current.entry.sop, info, screen, ratio);
    }
    this.drawAnnotations(context, ratio);
    this.drawScaleBar(context, ratio, info);
    this.updateOverlay();
  }

  /** Image pixels -> canvas pixels: the frame fitted, zoomed, panned, rotated and flipped,
   * its rows stretched by the pixel aspect ratio. */
  imageMatrix(info, width, height, ratio) {
    const aspect = info.pixelSpacing.length === 2 && info.pixelSpacing[1] > 0 ? info.pixelSpacing[0] / info.pixelSpacing[1] : 1;
    const quarter = this.rotation % 180 !== 0;
    const shownW = quarter ? info.rows * aspect : info.columns, shownH = quarter ? info.columns : info.rows * aspect;
    const scale = Math.min(width / shownW, height / shownH) * this.zoom;
    this.scale = scale / ratio;
    return new DOMMatrix()
      .translate(width / 2 + this.pan[0] * ratio, height / 2 + this.pan[1] * ratio)
      .rotate(this.rotation)
      .scale(this.flipH ? -scale : scale, (this.flipV ? -scale : scale) * aspect)
      .translate(-info.columns / 2, -info.rows / 2);
  }

  /** Image coordinates of a point of the page (a pointer), and back (tests use both). */
  toImage(clientX, clientY) {
    const rect = this.canvas.getBoundingClientRect(), ratio = window.devicePixelRatio || 1;
    const point = this.matrix.inverse().transformPoint(new DOMPoint((clientX - rect.left) * ratio, (clientY - rect.top) * ratio));
    return [point.x, point.y];
  }

  toPage(x, y) {
    const rect = this.canvas.getBoundingClientRect(), ratio = window.devicePixelRatio || 1;
    const point = this.matrix.transformPoint(new DOMPoint(x, y));
    return [rect.left + point.x / ratio, rect.top + point.y / ratio];
  }

  frameKey() { return this.current ? `${this.current.entry.sop}/${this.current.entry.frame}` : ""; }

  measurementsHere() {
    const key = this.frameKey();
    if (!this.annotations.has(key)) this.annotations.set(key, []);
    return this.annotations.get(key);
  }

  /** Recompute what an annotation measures on the frame on screen. */
  measure(annotation) {
    const { info, loaded } = this.current;
    const [a, b, c] = annotation.points;
    const unit = value(this.seriesItem || {}, "00080060") === "CT" ? " HU" : "";
    if (annotation.type === "length") {
      const found = length(info, a, b);
      annotation.result = found; annotation.label = `${found.value.toFixed(1)} ${found.unit}`;
    } else if (annotation.type === "angle" && c) {
      annotation.result = { value: angle(info, a, b, c) }; annotation.label = `${annotation.result.value.toFixed(1)}°`;
    } else if (annotation.type === "roi") {
      const found = ellipseStats(info, loaded.data, a, b);
      const t = this.app.t;
      annotation.result = found;
      annotation.label = found.count ? `${t.mean} ${found.mean.toFixed(1)}${unit}  ${t.sd} ${found.sd.toFixed(1)}\nmin ${found.min.toFixed(0)}  max ${found.max.toFixed(0)}\n${t.area} ${found.area.toFixed(1)} ${found.unit}²` : "";
    } else if (annotation.type === "probe") {
      const found = probe(info, loaded.data, a);
      annotation.result = found;
      annotation.label = found ? `(${found.column}, ${found.row}) ${Number(found.value.toFixed(2))}${unit}` : "";
    }
  }

  drawAnnotations(context, ratio) {
    const list = this.annotations.get(this.frameKey()) || [];
    context.save();
    context.strokeStyle = "#ffd75e"; context.fillStyle = "#ffd75e"; context.lineWidth = 1.5 * ratio;
    context.font = `${12 * ratio}px system-ui, sans-serif`;
    context.shadowColor = "#000"; context.shadowBlur = 2 * ratio;
    const screen = ([x, y]) => { const p = this.matrix.transformPoint(new DOMPoint(x, y)); return [p.x, p.y]; };
    for (const annotation of list) {
      const points = annotation.points.map(screen);
      context.beginPath();
      if (annotation.type === "roi") {
        const [a, b] = annotation.points;
        const cx = (a[0] + b[0]) / 2, cy = (a[1] + b[1]) / 2, rx = Math.abs(b[0] - a[0]) / 2, ry = Math.abs(b[1] - a[1]) / 2;
        for (let k = 0; k <= 64; k++) {
          const [x, y] = screen([cx + rx * Math.cos((k * Math.PI) / 32), cy + ry * Math.sin((k * Math.PI) / 32)]);
          if (k) context.lineTo(x, y); else context.moveTo(x, y);
        }
      } else if (annotation.type === "probe") {
        const [x, y] = points[0];
        context.moveTo(x - 6 * ratio, y); context.lineTo(x + 6 * ratio, y); context.moveTo(x, y - 6 * ratio); context.lineTo(x, y + 6 * ratio);
      } else {
        points.forEach(([x, y], k) => (k ? context.lineTo(x, y) : context.moveTo(x, y)));
      }
      context.stroke();
      if (annotation.label) {
        const [x, y] = points[points.length - 1];
        annotation.label.split("\n").forEach((line, k) => context.fillText(line, x + 8 * ratio, y + (k * 14 + 4) * ratio));
      }
    }
    context.restore();
  }

  /** A bar of a round number of millimetres under the image, when the pixel spacing is known. */
  drawScaleBar(context, ratio, info) {
    if (info.pixelSpacing.length !== 2 || !(info.pixelSpacing[0] > 0)) return;
    const inverse = this.matrix.inverse();
    const mmPerPixel = Math.hypot(inverse.a * info.pixelSpacing[1], inverse.b * info.pixelSpacing[0]);
    const mm = scaleBarMm((this.canvas.width / 5) * mmPerPixel);
    if (!mm) return;
    const length = mm / mmPerPixel, x = (this.canvas.width - length) / 2, y = this.canvas.height - 12 * ratio;
    context.save();
    context.strokeStyle = "#f4f7fa"; context.fillStyle = "#f4f7fa"; context.lineWidth = 2 * ratio;
    context.beginPath(); context.moveTo(x, y - 4 * ratio); context.lineTo(x, y); context.lineTo(x + length, y); context.lineTo(x + length, y - 4 * ratio); context.stroke();
    context.font = `${11 * ratio}px system-ui, sans-serif`; context.textAlign = "center";
    context.fillText(`${mm} mm`, x + length / 2, y - 5 * ratio);
    context.restore();
    this.scaleBar = { mm, pixels: length / ratio };
  }

  /** A new measurement (or an angle's second arm) at image point p. */
  startMeasurement(tool, p) {
    const list = this.measurementsHere();
    if (tool === "angle" && this.pendingAngle && list.includes(this.pendingAngle)) {
      const annotation = this.pendingAngle;
      annotation.points.push([...p]);
      this.pendingAngle = null;
      return annotation;
    }
    if (tool === "probe") for (let k = list.length - 1; k >= 0; k--) if (list[k].type === "probe") list.splice(k, 1);
    const annotation = { type: tool, points: tool === "probe" ? [[...p]] : [[...p], [...p]] };
    list.push(annotation);
    this.measure(annotation);
    this.draw();
    return annotation;
  }

  finishMeasurement(annotation) {
    const [a, b] = annotation.points;
    if (annotation.type !== "probe" && annotation.points.length === 2 && a[0] === b[0] && a[1] === b[1]) {
      const list = this.measurementsHere();  // a click, not a drag: nothing measured
      list.splice(list.indexOf(annotation), 1);
    } else if (annotation.type === "angle" && annotation.points.length === 2) {
      this.pendingAngle = annotation;  // the first arm: the next press draws the second
    }
    this.measure(annotation);
    this.draw();
    window.dgwViewer.measurements = [...this.measurementsHere()].map((m) => ({ type: m.type, points: m.points, result: m.result }));
  }

  rotate() { this.rotation = (this.rotation + 90) % 360; this.draw(); }
  flip(horizontal) { if (horizontal) this.flipH = !this.flipH; else this.flipV = !this.flipV; this.draw(); }
  clearMeasurements() { this.annotations.delete(this.frameKey()); this.pendingAngle = null; this.draw(); }

  /** The viewport as a PNG (image, measurements and the overlay's text), downloaded. */
  exportPng() {
    const copy = document.createElement("canvas");
    copy.width = this.canvas.width; copy.height = this.canvas.height;
    const context = copy.getContext("2d");
    context.drawImage(this.canvas, 0, 0);
    const ratio = window.devicePixelRatio || 1;
    context.font = `${12 * ratio}px system-ui, sans-serif`; context.fillStyle = "#f4f7fa";
    context.shadowColor = "#000"; context.shadowBlur = 2 * ratio;
    const corners = [["left", "top"], ["right", "top"], ["left", "bottom"], ["right", "bottom"]];
    this.overlays.forEach((overlay, k) => {
      const lines = overlay.textContent.split("\n");
      const [side, edge] = corners[k];
      context.textAlign = side;
      lines.forEach((line, n) => {
        const y = edge === "top" ? (n + 1) * 15 * ratio : copy.height - (lines.length - n - 0.3) * 15 * ratio;
        context.fillText(line, side === "left" ? 6 * ratio : copy.width - 6 * ratio, y);
      });
    });
    copy.toBlob((blob) => {
      const link = el("a", { href: URL.createObjectURL(blob), download: `image-${this.index + 1}.png` });
      document.body.append(link); link.click(); link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
    }, "image/png");
  }

  /** The other view follows this one to the image nearest along its slice normal (1x2). */
  syncOther() {
    const other = this.app.viewports.find((v) => v !== this);
    if (!this.app.sync || this.app.layout !== 2 || !other || !other.stack || !this.current) return;
    const position = this.current.info.position, frames = other.stack.frames;
    const normal = sliceNormal(frames[0] && frames[0].info.orientation);
    if (!normal || position.length !== 3 || frames.some((f) => f.info.position.length !== 3)) return;
    const target = dot(position, normal);
    let best = other.index;
    frames.forEach((f, k) => { if (Math.abs(dot(f.info.position, normal) - target) < Math.abs(dot(frames[best].info.position, normal) - target)) best = k; });
    if (best !== other.index) { other.index = best; other.render(); }
  }

  updateOverlay() {
    const t = this.app.t;
    const { info } = this.current;
    const series = this.seriesItem || {};
    const total = this.stack.frames.length;
    const [center, width] = this.window || [0, 0];
    const study = this.app.studyOf(this.stack.study) || {};
    const shifted = this.stack.datesShifted ? ` (${t.shifted})` : "";
    this.overlays[0].textContent = [`${t.patient} ${value(study, "00100020") || "—"}`, value(study, "00081030") || "",
      formatDate(value(study, "00080020")) + shifted].filter(Boolean).join("\n");
    this.overlays[1].textContent = `${value(series, "00080060") || ""} ${t.series} ${value(series, "00200011") ?? ""}\n${value(series, "0008103E") || ""}\n${t.im} ${this.index + 1} / ${total}  (#${info.instanceNumber || "-"})`;
    this.overlays[2].textContent = `W ${Math.round(width)}  L ${Math.round(center)}${this.invert ? "  ⇆" : ""}\n${t.zoom} ${(this.scale || 1).toFixed(2)}×`;
    const location = info.sliceLocation !== undefined ? `Loc ${Number(info.sliceLocation).toFixed(1)} mm` :
      info.position.length === 3 ? `Pos ${info.position.map((v) => v.toFixed(1)).join(", ")}` : "";
    this.overlays[3].textContent = [this.presentation ? `PR: ${this.presentation.label || t.kinds.PR}` : "",
      (this.segmentLegend || []).length ? `SEG: ${this.segmentLegend.join(", ")}` : "",
      location, info.sliceThickness ? `Th ${Number(info.sliceThickness).toFixed(1)} mm` : ""].filter(Boolean).join("\n");
    const inverse = this.matrix.inverse();
    const markers = orientationMarkers(info.orientation, [inverse.a, inverse.b], [inverse.c, inverse.d]) || {};
    for (const [edge, node] of Object.entries(this.markers)) node.textContent = markers[edge] || "";
  }

  scroll(delta) {
    if (!this.stack) return;
    const next = Math.min(this.stack.frames.length - 1, Math.max(0, this.index + delta));
    if (next !== this.index) {
      this.index = next;
      this.stack.movedAt = performance.now();
      timings.asked.push([next, performance.now()]);
      this.render();
    }
  }

  setWindow(center, width) { this.window = [center, Math.max(1, width)]; this.windowChanged = true; this.render(); }
  datasetWindow() { this.window = null; this.windowChanged = false; this.render(); }
  reset() {  // as the series came: with its presentation state's rotation, flip and window, if any
    const state = this.presentation;
    this.zoom = 1; this.pan = [0, 0]; this.invert = state ? state.inverse : false;
    this.rotation = state ? state.rotation : 0; this.flipH = state ? state.flipH : false; this.flipV = false;
    this.datasetWindow();
  }
  toggleInvert() { this.invert = !this.invert; this.render(); }

  /** Frames per second: the chosen rate, else the data set's own (Recommended Display Frame
   * Rate, Cine Rate, Frame Time), else 15. */
  cineRate() {
    if (this.app.fps) return this.app.fps;
    const info = this.current && this.current.info;
    const own = info && (info.frameRate || (info.frameTime ? 1000 / info.frameTime : 0));
    return own > 0 && own <= 120 ? own : 15;
  }

  toggleCine() {
    if (this.cine) { this.stopCine(); return; }
    if (!this.stack) return;
    const rate = this.cineRate();
    this.cine = setInterval(() => {
      if (!this.stack) return;
      this.index = (this.index + 1) % this.stack.frames.length;
      this.render();
    }, 1000 / rate);
    this.cineFps = rate;
    this.app.updateToolbar();
  }
  stopCine() { if (this.cine) { clearInterval(this.cine); this.cine = null; this.app.updateToolbar(); } }

  bindEvents() {
    const canvas = this.canvas;
    // Mouse: the active tool with the left button, zoom with the right one, pan with the
    // middle one or Shift. Touch: one finger uses the active tool (scrolling by default on
    // a touch screen), two fingers pinch to zoom and move to pan.
    const pointers = new Map();
    let gesture = null;
    const pair = () => {
      const [a, b] = [...pointers.values()];
      return { distance: Math.hypot(a.x - b.x, a.y - b.y) || 1, mid: [(a.x + b.x) / 2, (a.y + b.y) / 2] };
    };
    canvas.addEventListener("pointerdown", (event) => {
      this.app.activate(this);
      canvas.focus();
      canvas.setPointerCapture(event.pointerId);
      pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
      if (pointers.size === 2) {
        gesture = { tool: "pinch", ...pair(), zoom: this.zoom, pan: [...this.pan] };
      } else if (pointers.size === 1) {
        const tool = event.button === 2 ? "zoom" : event.button === 1 || event.shiftKey ? "pan" : this.app.tool;
        gesture = { tool, x: event.clientX, y: event.clientY, window: this.window ? [...this.window] : null,
          zoom: this.zoom, pan: [...this.pan], index: this.index };
        if (MEASURING.has(tool) && this.current) gesture.annotation = this.startMeasurement(tool, this.toImage(event.clientX, event.clientY));
      }
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!pointers.has(event.pointerId) || !gesture) return;
      pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
      if (gesture.tool === "pinch") {
        if (pointers.size < 2) return;
        const now = pair();
        this.zoom = Math.min(20, Math.max(0.1, gesture.zoom * now.distance / gesture.distance));
        this.pan = [gesture.pan[0] + now.mid[0] - gesture.mid[0], gesture.pan[1] + now.mid[1] - gesture.mid[1]];
        this.draw();
        return;
      }
      const dx = event.clientX - gesture.x, dy = event.clientY - gesture.y, start = gesture;
      if (start.annotation) {
        const points = start.annotation.points;
        points[start.annotation.type === "probe" ? 0 : points.length - 1] = this.toImage(event.clientX, event.clientY);
        this.measure(start.annotation);
        this.draw();
      } else if (start.tool === "wl" && start.window) this.setWindow(start.window[0] + dy * Math.max(1, start.window[1] / 256), start.window[1] + dx * Math.max(1, start.window[1] / 256));
      else if (start.tool === "zoom") { this.zoom = Math.min(20, Math.max(0.1, start.zoom * Math.exp(-dy / 200))); this.draw(); }
      else if (start.tool === "pan") { this.pan = [start.pan[0] + dx, start.pan[1] + dy]; this.draw(); }
      else if (start.tool === "scroll" && this.stack) {
        const next = Math.min(this.stack.frames.length - 1, Math.max(0, start.index + Math.round(dy / 8)));
        if (next !== this.index) this.scroll(next - this.index);
      }
    });
    const up = (event) => {
      if (gesture && gesture.annotation && pointers.size === 1) this.finishMeasurement(gesture.annotation);
      pointers.delete(event.pointerId);
      if (!pointers.size) gesture = null;
      else if (gesture && gesture.tool === "pinch") gesture = null;  // lift both to start anew
    };
    canvas.addEventListener("pointerup", up);
    canvas.addEventListener("pointercancel", up);
    canvas.addEventListener("contextmenu", (event) => event.preventDefault());
    canvas.addEventListener("dblclick", () => { this.zoom = 1; this.pan = [0, 0]; this.draw(); });
    canvas.addEventListener("wheel", (event) => {
      event.preventDefault();
      this.app.activate(this);
      if (event.ctrlKey) { this.zoom = Math.min(20, Math.max(0.1, this.zoom * Math.exp(-event.deltaY / 300))); this.draw(); }
      else this.scroll(event.deltaY > 0 ? 1 : -1);
    }, { passive: false });
    canvas.addEventListener("keydown", (event) => this.app.onKey(event, this));
  }
}

class App {
  constructor(root) {
    this.rootNode = root;
    this.lang = root.dataset.lang === "en" ? "en" : "fr";
    this.t = TEXT[this.lang];
    this.api = new DicomWeb(root.dataset.root + "/dicom-web");
    this.cache = new FrameCache(CACHE_BYTES);
    this.studies = [];
    // On a touch screen one finger scrolls through the stack unless another tool is chosen.
    this.touch = window.matchMedia("(pointer: coarse)").matches;
    this.tool = this.touch ? "scroll" : "wl";
    this.sync = false;
    this.fps = 0;  // the cine's rate; 0: the data set's own
    this.layout = 1;
  }

  studyOf(uid) { return this.studies.find((s) => value(s, "0020000D") === uid); }

  async start() {
    this.build();
    // The browser's decoder of the default storage codec starts with the page: on a slow
    // link its WebAssembly arrives and compiles while the study list and the first image
    // load (which comes decoded by the server if the decoder is not ready yet).
    this.api.warmDecoder("1.2.840.10008.1.2.4.201");
    try {
      this.studies = await this.api.json("/studies?includefield=00081030,00280303,00101010&limit=100");
    } catch (error) {
      this.sidebar.append(el("p", { class: "error", role: "alert", text: this.t.loadError }));
      throw error;
    }
    this.studies.sort((a, b) => String(value(b, "00080020") || "").localeCompare(String(value(a, "00080020") || "")));
    const listed = await Promise.all(this.studies.map((study) => this.api.json(`/studies/${value(study, "0020000D")}/series`)));
    this.seriesOf = new Map(this.studies.map((study, position) => [value(study, "0020000D"), listed[position]]));
    // One section per patient (pseudonym), never mixed: a share of several patients says so.
    const patients = new Map();
    this.studies.forEach((study, position) => {
      const id = value(study, "00100020") || "—";
      if (!patients.has(id)) patients.set(id, { first: study, studies: [] });
      patients.get(id).studies.push([study, listed[position]]);
    });
    const t = this.t;
    if (patients.size > 1) this.sidebar.append(el("p", { class: "warning", role: "note", text: t.patients(patients.size) }));
    if (this.studies.some((study) => value(study, "00280303") === "MODIFIED"))
      this.sidebar.append(el("p", { class: "shifted-notice", text: `† ${t.datesShifted}` }));
    let first = null;
    const studyMetas = new Map();  // where each study says what its site withheld
    for (const [id, patient] of patients) {
      const sex = value(patient.first, "00100040");
      const about = [sex ? t.sex[sex] || sex : "", value(patient.first, "00101010") || ""].filter(Boolean).join(" · ");
      const section = el("section", { class: "patient", "aria-label": `${t.patient} ${id}` },
        el("h2", {}, el("span", { class: "label", text: `${t.patient} ` }), el("span", { class: "pseudonym", text: id })),
        about ? el("div", { class: "study-meta", text: about }) : null);
      for (const [study, seriesList] of patient.studies) {
        const studyUid = value(study, "0020000D");
        const series = seriesList.sort((a, b) => (Number(value(a, "00200011")) || 0) - (Number(value(b, "00200011")) || 0));
        const tiles = series.map((item) => {
          const seriesUid = value(item, "0020000E");
          const count = Number(value(item, "00201209") ?? NaN);
          const label = `${value(item, "00080060") || ""} ${value(item, "00200011") ?? ""} — ${value(item, "0008103E") || ""}`;
          const image = !NON_IMAGE_MODALITIES.has(value(item, "00080060"));
          const tile = el("button", { class: "series-tile", type: "button", "aria-label": label, "data-series": seriesUid,
            onclick: () => this.open(this.active, studyUid, seriesUid, item, tile) },
            // A series without a renderable image (e.g. a frame over the render limit: 422) keeps an empty tile, not a broken-image icon.
            image ? el("img", { alt: "", src: this.api.thumbnail(studyUid, seriesUid), loading: "lazy",
              onerror: (event) => event.target.removeAttribute("src") })
              : el("span", { class: "kind", "aria-hidden": "true", text: value(item, "00080060") }),
            el("span", { class: "desc" }, el("strong", { text: `${value(item, "00080060") || ""} ${value(item, "00200011") ?? ""}` }), el("br"),
              document.createTextNode(value(item, "0008103E") || ""), el("br"),
              el("span", { class: "count", text: [value(item, "00180015") || "",
                Number.isNaN(count) ? `? ${t.images}` : countOf(t, count)].filter(Boolean).join(" · ") })));
          if (!first && image && count > 0) first = { studyUid, seriesUid, item, tile };
          return tile;
        });
        const modalities = values(study, "00080061").join(", ");
        const shifted = value(study, "00280303") === "MODIFIED" ? " †" : "";
        const heading = value(study, "00081030") || [modalities, formatDate(value(study, "00080020"))].filter(Boolean).join(" · ");
        const total = Number(value(study, "00201208") ?? NaN);
        const meta = `${formatDate(value(study, "00080020"))}${shifted} · ${modalities} · ${Number.isNaN(total) ? "?" : countOf(t, total)}`;
        const studyMeta = el("div", { class: "study-meta", text: meta });
        studyMetas.set(studyUid, studyMeta);
        section.append(el("section", { class: "study", "aria-label": heading },
          el("h3", { text: heading }), studyMeta, el("div", { class: "study-series" }, ...tiles)));
      }
      this.sidebar.append(section);
    }
    if (!first) {  // only reports or other non-image series: open the first of them
      const tile = this.sidebar.querySelector(".series-tile");
      if (tile) tile.click();
    } else {
      await this.open(this.viewports[0], first.studyUid, first.seriesUid, first.item, first.tile);
    }
    this.tellWithheld(studyMetas);  // after the first image: its request never delays it
  }

  /** Under each study, what its producing site withheld and why. */
  async tellWithheld(studyMetas) {
    const t = this.t;
    const missing = await this.withheld();
    for (const [studyUid, studyMeta] of studyMetas) {
      const parts = missing[studyUid] || [];
      if (parts.length) studyMeta.after(el("div", { class: "withheld", role: "note" }, el("span", { text: t.withheld }),
        el("ul", {}, ...parts.map((part) => el("li", { text: `${countOf(t, part.count)} ${part.modality}${t.colon}${t.withheldWhy[part.reason] || part.reason}` }))),
        el("span", { text: t.askSite })));
    }
  }

  /** What the producing sites withheld of the shared studies (uid -> parts); the viewer
   * works without it. */
  async withheld() {
    try {
      const response = await fetch(this.rootNode.dataset.root + "/withheld", { credentials: "same-origin" });
      if (!response.ok) throw new Error(`withheld: ${response.status}`);
      return (await response.json()).studies || {};
    } catch (error) {
      window.dgwViewer.errors.push(String(error));
      return {};
    }
  }

  /** The site's sealed context, decrypted here with the key of the link's fragment. */
  async showContext(box, sealed) {
    const t = this.t;
    const key = keepContextKey();
    if (!key) { box.append(el("p", { text: t.contextNoKey })); return; }
    try {
      const context = await openContext(sealed, key);
      const known = Object.keys(t.fields).filter((name) => context[name]);
      const others = Object.keys(context).filter((name) => !(name in t.fields) && context[name]);
      box.append(el("dl", {}, ...[...known, ...others].flatMap((name) =>
        [el("dt", { text: t.fields[name] || name }),
          el("dd", { text: name.endsWith("_name") ? context[name].replace(/\^+/g, " ").trim() : context[name] })])));
      box.classList.add("opened");
    } catch (error) {
      box.append(el("p", { class: "error", text: String(error.message) === "insecure-context" ? t.contextInsecure : t.contextBad }));
    }
  }

  /** The segmentations (SEG series) of a study that reference series `seriesUid`: for each,
   * its segments (number -> label, colour) and, per source instance, the SEG frames drawn
   * over it. */
  async segmentationsFor(studyUid, seriesUid) {
    const found = [];
    for (const item of (this.seriesOf && this.seriesOf.get(studyUid)) || []) {
      if (value(item, "00080060") !== "SEG") continue;
      const segSeries = value(item, "0020000E");
      try {
        const [instance] = await this.api.json(`/studies/${studyUid}/series/${segSeries}/instances?limit=1`);
        const sop = value(instance, "00080018");
        const [metadata] = await this.api.json(`/studies/${studyUid}/series/${segSeries}/instances/${sop}/metadata`);
        if (!values(metadata, "00081115").some((r) => value(r, "0020000E") === seriesUid)) continue;
        found.push(segmentationOf(metadata, studyUid, segSeries, sop, value(instance, "00083002")));
      } catch (error) {
        window.dgwViewer.errors.push(String(error));
      }
    }
    return found;
  }

  /** Open the series holding instance `sop` of a study (an image a report cites) at it. */
  async openInstance(viewport, studyUid, sop) {
    const [found] = await this.api.json(`/studies/${studyUid}/instances?00080018=${encodeURIComponent(sop)}&limit=1`);
    if (!found) return;
    const seriesUid = value(found, "0020000E");
    const tile = this.sidebar.querySelector(`.series-tile[data-series="${CSS.escape(seriesUid)}"]`);
    await this.open(viewport, studyUid, seriesUid, undefined, tile, sop);
  }

  async open(viewport, studyUid, seriesUid, item, tile, focusSop) {
    for (const node of this.sidebar.querySelectorAll(".series-tile.active")) if (viewport === this.viewports[0] || this.layout === 1) node.classList.remove("active");
    if (tile) tile.classList.add("active");
    if (!item) item = (await this.api.json(`/studies/${studyUid}/series?0020000E=${encodeURIComponent(seriesUid)}`))[0];
    await viewport.show(studyUid, seriesUid, item, focusSop);
  }

  build() {
    const t = this.t;
    const data = this.rootNode.dataset;
    const button = (text, attributes, onclick) => el("button", { type: "button", ...attributes, onclick }, text);
    this.toolSelect = el("select", { "aria-label": t.tool, onchange: (e) => { this.tool = e.target.value; } },
      ...[["wl", t.toolWl], ["scroll", t.toolScroll], ["pan", t.toolPan], ["zoom", t.toolZoom], ["length", t.toolLength],
        ["angle", t.toolAngle], ["roi", t.toolRoi], ["probe", t.toolProbe]].map(([value, text]) =>
        el("option", { value, text, selected: value === this.tool })));
    this.presetSelect = el("select", { "aria-label": t.presets, onchange: (e) => this.preset(e.target.value) },
      el("option", { value: "", text: t.presets }), el("option", { value: "dataset", text: `0 · ${t.dataset}` }),
      ...PRESETS.map(([name], i) => el("option", { value: name, text: `${i + 1} · ${t[name]}` })));
    this.layoutButtons = [1, 2].map((n) => button(t[`layout${n}`], { "aria-pressed": String(n === 1), "data-layout": n }, () => this.setLayout(n)));
    this.cineButton = button(t.play, { "aria-pressed": "false", "aria-keyshortcuts": "Space" }, () => this.active.toggleCine());
    this.fpsSelect = el("select", { "aria-label": t.fps, onchange: (e) => {
      this.fps = Number(e.target.value) || 0;
      if (this.active.cine) { this.active.stopCine(); this.active.toggleCine(); }  // the new rate now
    } }, el("option", { value: "", text: t.fpsAuto }), ...[5, 10, 15, 20, 25, 30, 60].map((n) => el("option", { value: n, text: `${n} i/s` })));
    this.syncButton = button(t.sync, { "aria-pressed": "false", hidden: true }, () => {
      this.sync = !this.sync;
      this.syncButton.setAttribute("aria-pressed", String(this.sync));
      if (this.sync) this.active.syncOther();
    });
    const otherLang = this.lang === "fr" ? "en" : "fr";
    const expires = new Date(data.expires);
    this.help = el("dialog", { "aria-label": t.help },
      el("h2", { text: t.help }),
      el("table", {}, ...(this.touch ? [...t.touches, ...t.keys] : [...t.keys, ...t.touches]).map(([keys, what]) =>
        el("tr", {}, el("td", {}, el("kbd", { text: keys })), el("td", { text: what })))),
      el("form", { method: "dialog" }, el("button", { text: t.close })));
    const bar = el("header", { class: "topbar" },
      el("span", { class: "title", text: document.title }),
      this.toolSelect, this.presetSelect,
      button(t.invert, { "aria-keyshortcuts": "I" }, () => this.active.toggleInvert()),
      button(t.reset, { "aria-keyshortcuts": "R" }, () => this.active.reset()),
      this.cineButton, this.fpsSelect, ...this.layoutButtons, this.syncButton,
      button("⟳", { "aria-label": t.rotate, title: t.rotate }, () => this.active.rotate()),
      button("↔", { "aria-label": t.flipH, title: t.flipH }, () => this.active.flip(true)),
      button("↕", { "aria-label": t.flipV, title: t.flipV }, () => this.active.flip(false)),
      button("✕", { "aria-label": t.clear, title: t.clear }, () => this.active.clearMeasurements()),
      button("⛶", { "aria-label": t.fullscreen, title: t.fullscreen }, () => this.toggleFullscreen()),
      button("PNG", { "aria-label": t.exportPng, title: t.exportPng }, () => this.active.exportPng()),
      permitted(data, "download") ? el("a", { class: "button", href: `${data.root}/download`, download: "", text: t.download }) : null,
      el("span", { class: "spacer" }),
      el("span", { class: "expiry", title: expires.toISOString(),
        text: `${t.validUntil} ${expires.toLocaleString(this.lang === "fr" ? "fr-FR" : "en-GB", { dateStyle: "medium", timeStyle: "short" })}` }),
      data.uses ? el("span", { class: "uses", text: `${t.uses} ${data.uses.replace("/", " / ")}` }) : null,
      el("a", { href: `${location.pathname}?lang=${otherLang}`, hreflang: otherLang, text: t.language }),
      button("?", { "aria-label": t.help, "aria-keyshortcuts": "?" }, () => this.help.showModal()));
    this.sidebar = el("nav", { class: "sidebar", "aria-label": t.studies });
    if (data.context) {
      const box = el("aside", { class: "context", "aria-label": t.context }, el("strong", { text: t.context }));
      this.sidebar.append(box);
      this.showContext(box, data.context);
    }
    if (data.note) this.sidebar.append(el("aside", { class: "note" }, el("strong", { text: t.note }), el("p", { text: data.note })));
    this.viewports = [new Viewport(this, 0), new Viewport(this, 1)];
    this.viewportArea = el("main", { class: "viewports layout-1" }, this.viewports[0].node);
    this.ended = el("dialog", { class: "session-ended", "aria-label": t.reopen },
      el("p", { text: t.sessionEnded }), el("button", { type: "button", text: t.reopen, onclick: () => location.reload() }));
    window.addEventListener("dgw-session-ended", () => { if (!this.ended.open) this.ended.showModal(); });
    this.rootNode.replaceChildren(bar, el("div", { class: "main" }, this.sidebar, this.viewportArea), this.help, this.ended);
    this.activate(this.viewports[0]);
    // Shortcuts work wherever the focus is, except in form fields and the help dialog;
    // a focused canvas handles its own keys.
    document.addEventListener("keydown", (event) => {
      const target = event.target;
      if (target.tagName === "CANVAS" || target.closest("dialog") || ["INPUT", "SELECT", "TEXTAREA"].includes(target.tagName)) return;
      if (event.key === "Enter" || event.key === "Tab" || event.key === " " && target.tagName === "BUTTON") return;
      this.onKey(event, this.active);
    });
  }

  activate(viewport) {
    this.active = viewport;
    for (const v of this.viewports) v.node.classList.toggle("active", v === viewport && this.layout === 2);
    this.updateToolbar();
  }

  updateToolbar() {
    if (this.cineButton) this.cineButton.setAttribute("aria-pressed", String(Boolean(this.active && this.active.cine)));
  }

  toggleFullscreen() {
    if (document.fullscreenElement) document.exitFullscreen();
    else if (this.viewportArea.requestFullscreen) this.viewportArea.requestFullscreen();
  }

  setLayout(n) {
    this.layout = n;
    this.syncButton.hidden = n !== 2;
    this.viewportArea.className = `viewports layout-${n}`;
    this.viewportArea.replaceChildren(...this.viewports.slice(0, n).map((v) => v.node));
    this.layoutButtons.forEach((b) => b.setAttribute("aria-pressed", String(Number(b.dataset.layout) === n)));
    if (n === 1) this.activate(this.viewports[0]);
    else {
      this.activate(this.viewports[1]);
      if (!this.viewports[1].stack && this.viewports[0].stack) {
        const s = this.viewports[0].stack;
        this.viewports[1].show(s.study, s.series, this.viewports[0].seriesItem);
      }
    }
    for (const v of this.viewports) v.draw();
  }

  preset(name) {
    this.presetSelect.value = "";
    if (!name) return;
    if (name === "dataset") { this.active.datasetWindow(); return; }
    const found = PRESETS.find(([n]) => n === name);
    if (found) this.active.setWindow(found[1], found[2]);
  }

  onKey(event, viewport) {
    const key = event.key;
    const handled = () => event.preventDefault();
    if (key === "ArrowDown" || key === "ArrowRight") { viewport.scroll(1); handled(); }
    else if (key === "ArrowUp" || key === "ArrowLeft") { viewport.scroll(-1); handled(); }
    else if (key === "PageDown") { viewport.scroll(10); handled(); }
    else if (key === "PageUp") { viewport.scroll(-10); handled(); }
    else if (key === "Home") { viewport.scroll(-1e9); handled(); }
    else if (key === "End") { viewport.scroll(1e9); handled(); }
    else if (key === "i" || key === "I") { viewport.toggleInvert(); handled(); }
    else if (key === "r" || key === "R") { viewport.reset(); handled(); }
    else if (key === " ") { viewport.toggleCine(); handled(); }
    else if (key === "?") { this.help.showModal(); handled(); }
    else if (key === "0") { viewport.datasetWindow(); handled(); }
    else if (/^[1-5]$/.test(key)) { const [, c, w] = PRESETS[Number(key) - 1]; viewport.setWindow(c, w); handled(); }
    else if (key === "Tab" && this.layout === 2 && event.target.tagName === "CANVAS") {
      const other = this.viewports[viewport === this.viewports[0] ? 1 : 0];
      this.activate(other); other.canvas.focus(); handled();
    }
  }
}

const root = document.getElementById("viewer");
if (root) {
  const app = new App(root);
  window.dgwViewer.app = app;  // for tests and the benchmark: read-only inspection
  app.start().catch((error) => { window.dgwViewer.errors.push(String(error)); });
}
