// AnchorDiff for ComfyUI: readable previews on our nodes and click-to-anchor on "Anchor Select".
//
// The backend renders each preview as one row of panels (one per concept) and sends them as
// `anchordiff_images` (ComfyUI temp images; not `images`, which every frontend draws by itself),
// with `anchordiff: [{concepts, colors, image_size: [H, W], panels, manual, node_id, made_from}]`.  This extension
// shows those rows in a DOM widget of our own (so the click geometry is the <img>'s own), with a
// legend of the concept colours.  On Anchor Select, a click on panel c writes "<concept>: x, y"
// (image pixels) into the node's `manual_anchors` widget; shift-click adds another point.
// Only our own node types are touched, through beforeRegisterNodeDef / nodeCreated.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ANCHOR_SELECT = "AnchorDiffAnchorSelect";
const PREVIEW_NODES = new Set([
  ANCHOR_SELECT,
  "AnchorDiffPropagate",
  "AnchorDiffMask",
  "AnchorDiffCrossAttentionHeat",
  "AnchorDiffConceptAttentionHeat",
  "AnchorDiffSeg4DiffHeat",
]);
const PREVIEW_WIDGET = "anchordiff_preview";
const IMAGES_KEY = "anchordiff_images"; // the node output key of our pictures (nodes/common.py)
const HISTORY_ITEMS = 64; // newest /history entries searched for a reloaded workflow's pictures
const RESET_BUTTON = "reset to automatic";
const LEGEND_SETTING = "AnchorDiff.Preview.Legend";
const PANEL_MIN_WIDTH = 200; // px of node width per concept panel when a preview arrives
const NODE_MAX_WIDTH = 1000;
const LEGEND_HEIGHT = 18; // px, as in anchordiff.css
const HINT_HEIGHT = 16;
const ROW_MAX_HEIGHT = 480; // px: taller pictures are shown smaller (object-fit: contain)

// ---- geometry -------------------------------------------------------------------------------

/** Client point -> {concept, x, y} in image pixels, or null outside the picture.
 *  `rect`: the <img> box on screen (getBoundingClientRect); `natural`: [width, height] of the
 *  preview picture.  The picture is shown with object-fit: contain, so it is scaled uniformly and
 *  centred in the box.  It is `panels` equal panels side by side; each panel is the whole
 *  image_size [H, W] image. */
export function clientToImagePoint(info, rect, natural, clientX, clientY) {
  const [naturalW, naturalH] = natural;
  const [imageH, imageW] = info.image_size;
  const scale = Math.min(rect.width / naturalW, rect.height / naturalH);
  const shownW = naturalW * scale;
  const shownH = naturalH * scale;
  const fx = (clientX - rect.left - (rect.width - shownW) / 2) / shownW; // 0..1 across all panels
  const fy = (clientY - rect.top - (rect.height - shownH) / 2) / shownH; // 0..1 down
  if (!(fx >= 0 && fx < 1 && fy >= 0 && fy < 1)) return null;
  const across = fx * info.panels;
  const concept = Math.floor(across);
  const clamp = (v, n) => Math.min(n - 1, Math.max(0, Math.floor(v)));
  return { concept, x: clamp((across - concept) * imageW, imageW), y: clamp(fy * imageH, imageH) };
}

// ---- the manual_anchors text ----------------------------------------------------------------

/** How a concept is named in a "<concept>: x, y" line: its name, or its 1-based number where
 *  the name would be read otherwise (all digits, or containing the ';' separator). */
function conceptLabel(info, concept) {
  const name = info.concepts[concept];
  return /^\d+$/.test(name) || name.includes(";") || name.includes("\n") ? String(concept + 1) : name;
}

/** The manual_anchors text with a point for `concept` put in: replacing that concept's lines,
 *  or added to them when `add` (shift-click). Other lines are kept as they are. */
export function withAnchor(text, info, point, add) {
  const name = info.concepts[point.concept];
  const number = String(point.concept + 1);
  const lines = (text || "").split(/[\n;]/).map((l) => l.trim()).filter(Boolean);
  const ofConcept = (line) => {
    const colon = line.lastIndexOf(":");
    const who = colon < 0 ? "" : line.slice(0, colon).trim();
    return who === name || who === number;
  };
  const kept = add ? lines : lines.filter((l) => !ofConcept(l));
  kept.push(`${conceptLabel(info, point.concept)}: ${point.x}, ${point.y}`);
  return kept.join("\n");
}

// ---- the preview widget ---------------------------------------------------------------------

function el(tag, className, props = {}) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  return Object.assign(e, props);
}

function imageURL(image) {
  const params = new URLSearchParams({ filename: image.filename, type: image.type, subfolder: image.subfolder ?? "" });
  return api.apiURL(`/view?${params}${app.getPreviewFormatParam()}${app.getRandParam()}`);
}

function toast(severity, summary, detail) {
  app.extensionManager?.toast?.add({ severity, summary, detail, life: 4000 });
}

const SVG = "http://www.w3.org/2000/svg";

/** State and DOM of one node's preview. */
class Preview {
  constructor(node) {
    this.node = node;
    this.info = null;
    this.key = "";
    this.shown = 0; // pictures shown so far (a stored output checked meanwhile is not shown over a newer one)
    this.pending = []; // manual points placed since the last run: {concept, x, y}
    this.legendShown = true;
    this.root = el("div", "anchordiff-preview");
    this.root.dataset.nodeType = node.comfyClass;
    this.legend = el("div", "anchordiff-legend");
    this.rows = el("div", "anchordiff-rows");
    this.hint = el("div", "anchordiff-hint");
    this.root.append(this.legend, this.rows, this.hint);
    this.clickable = node.comfyClass === ANCHOR_SELECT;
    this.setHint();
  }

  setHint() {
    if (!this.info) this.hint.textContent = "Run the workflow to see the preview.";
    else if (this.clickable) this.hint.textContent = "Click a panel to anchor that concept there; shift-click adds a point.";
    else this.hint.textContent = "";
  }

  /** Show a node output ({anchordiff_images, anchordiff}); the same output twice is shown once. */
  show(output) {
    const info = output?.anchordiff?.[0];
    const images = output?.[IMAGES_KEY] ?? [];
    const key = images.map((i) => `${i.type}/${i.subfolder}/${i.filename}`).join("|");
    if (!info || !images.length || key === this.key) return;
    this.key = key;
    this.shown += 1;
    this.info = info;
    this.pending = [];
    this.root.dataset.nodeId = String(this.node.id);
    this.drawLegend();
    this.rows.replaceChildren(...images.map((image) => this.row(image)));
    this.setHint();
  }

  drawLegend() {
    const { info } = this;
    const on = app.extensionManager?.setting?.get(LEGEND_SETTING) ?? true;
    this.legendShown = on;
    this.legend.style.display = on ? "" : "none";
    this.legend.replaceChildren(
      ...info.concepts.map((name, c) => {
        const item = el("span", "anchordiff-legend-item", { title: info.manual?.[c] ? "anchor placed by hand" : "" });
        const swatch = el("span", "anchordiff-swatch");
        swatch.style.background = info.colors[c];
        item.append(swatch, `${c + 1}: ${name}${info.manual?.[c] ? " (manual)" : ""}`);
        return item;
      }),
    );
  }

  row(image) {
    const row = el("div", "anchordiff-row");
    const img = el("img", "anchordiff-image", { draggable: false, alt: "AnchorDiff preview" });
    const overlay = document.createElementNS(SVG, "svg");
    overlay.classList.add("anchordiff-overlay");
    overlay.setAttribute("preserveAspectRatio", "xMidYMid meet"); // = the image's object-fit: contain
    img.addEventListener("load", () => {
      // the row's own height where the frontend sizes widgets by their content (Nodes 2.0)
      row.style.aspectRatio = `${img.naturalWidth} / ${img.naturalHeight}`;
      overlay.setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
      this.drawPending();
      this.fitNode();
    });
    img.src = imageURL(image);
    row.append(img, overlay);
    if (this.clickable) {
      row.classList.add("anchordiff-clickable");
      // On press, where the user sees the picture (not a canvas drag or a node selection).
      row.addEventListener("pointerdown", (e) => {
        if (e.button !== 0) return;
        e.stopPropagation();
        this.onClick(e, img);
      });
    }
    return row;
  }

  /** Markers for the points placed since the last run, in preview-picture coordinates. */
  drawPending() {
    const { info } = this;
    for (const row of this.rows.children) {
      const img = row.querySelector("img");
      const overlay = row.querySelector("svg");
      overlay.replaceChildren();
      if (!info || !img.naturalWidth) continue;
      const panelW = img.naturalWidth / info.panels;
      for (const p of this.pending) {
        const cx = (p.concept + (p.x + 0.5) / info.image_size[1]) * panelW;
        const cy = ((p.y + 0.5) / info.image_size[0]) * img.naturalHeight;
        const r = Math.max(8, img.naturalHeight / 18);
        const shapes = [
          { r, fill: "none", stroke: "#000", "stroke-width": 5 },
          { r, fill: "none", stroke: info.colors[p.concept], "stroke-width": 2.5, "stroke-dasharray": "4 3" },
          { r: 2.5, fill: "#fff", stroke: "#000", "stroke-width": 1 },
        ];
        for (const attrs of shapes) {
          const circle = document.createElementNS(SVG, "circle");
          Object.entries({ cx, cy, ...attrs }).forEach(([k, v]) => circle.setAttribute(k, v));
          circle.classList.add("anchordiff-pending");
          overlay.append(circle);
        }
      }
    }
  }

  onClick(event, img) {
    if (!this.info || !img.naturalWidth) return;
    const point = clientToImagePoint(this.info, img.getBoundingClientRect(), [img.naturalWidth, img.naturalHeight], event.clientX, event.clientY);
    if (!point) return;
    const widget = this.node.widgets?.find((w) => w.name === "manual_anchors");
    if (!widget) return;
    const linked = this.node.inputs?.find((i) => i.widget?.name === "manual_anchors" && i.link != null);
    if (linked) {
      toast("warn", "AnchorDiff", "manual_anchors comes from a link: disconnect it to place anchors by clicking.");
      return;
    }
    widget.value = withAnchor(widget.value, this.info, point, event.shiftKey); // the setter runs its callback
    if (!event.shiftKey) this.pending = this.pending.filter((p) => p.concept !== point.concept);
    this.pending.push(point);
    this.drawPending();
    this.node.setDirtyCanvas?.(true, true);
  }

  reset() {
    this.pending = [];
    this.drawPending();
  }

  /** Height of the preview pictures when they fill the node's width (capped per row). */
  picturesHeight() {
    const img = this.rows.querySelector("img");
    if (!img?.naturalWidth) return 80 * Math.max(1, this.rows.children.length);
    const perRow = ((this.node.size[0] - 20) / img.naturalWidth) * img.naturalHeight;
    return Math.min(ROW_MAX_HEIGHT, Math.max(60, perRow)) * this.rows.children.length;
  }

  /** Legend + hint + gaps (fixed heights in anchordiff.css, so the layout never waits on the DOM). */
  chrome() {
    return (this.legendShown ? LEGEND_HEIGHT + 4 : 0) + HINT_HEIGHT + 4;
  }

  /** The widget's minimum height: the pictures at the node's width, the legend and the hint,
   *  so a preview is never squeezed by the node's other widgets. */
  widgetMinHeight() {
    return this.info ? this.picturesHeight() + this.chrome() : 40;
  }

  /** Widen the node when a preview arrives so each panel is readable, and make room for it. */
  fitNode() {
    const node = this.node;
    const width = Math.min(NODE_MAX_WIDTH, Math.max(node.size[0], this.info.panels * PANEL_MIN_WIDTH + 20));
    node.setSize([width, node.size[1]]);
    node.setSize([width, Math.max(node.size[1], node.computeSize()[1])]);
    node.setDirtyCanvas?.(true, true);
  }
}

// ---- widgets read only for some choices ------------------------------------------------------

const USED_WHEN = "anchordiff_used_when"; // input option set by nodes/common.py used_when()

/** {widget name: {other widget: [values under which the widget is read]}} from a node definition. */
function usedWhen(nodeData) {
  const found = {};
  for (const group of ["required", "optional"])
    for (const [name, spec] of Object.entries(nodeData.input?.[group] ?? {}))
      if (spec?.[1]?.[USED_WHEN]) found[name] = spec[1][USED_WHEN];
  return found;
}

/** Grey out (the frontend's own `disabled`, as its webcam node does) each widget its node does not
 *  read with the current choices, e.g. Propagate's `steps` unless steps_setting is "custom": the
 *  classic canvas then draws it without its value and ignores clicks on it, Nodes 2.0 dims it.
 *  Its value is kept, saved and sent as before. */
function updateUsedWidgets(node) {
  const rules = node.constructor.anchordiffUsedWhen;
  if (!rules || !node.widgets) return;
  const value = (name) => node.widgets.find((w) => w.name === name)?.value;
  let changed = false;
  for (const [name, conditions] of Object.entries(rules)) {
    const widget = node.widgets.find((w) => w.name === name);
    if (!widget) continue;
    const used = Object.entries(conditions).every(([other, values]) => values.includes(value(other)));
    if (widget.disabled === !used) continue;
    widget.disabled = !used;
    changed = true;
  }
  if (changed) {
    node.updateComputedDisabled?.();
    node.setDirtyCanvas?.(true, false);
  }
}

/** Re-check the greyed widgets whenever a widget they depend on gets a value: a user's choice (its
 *  callback), a loaded workflow or a script (its value setter, wrapped on this widget only). */
function watchChoices(node) {
  const rules = node.constructor.anchordiffUsedWhen;
  if (!rules) return;
  const watched = new Set(Object.values(rules).flatMap((conditions) => Object.keys(conditions)));
  for (const widget of node.widgets ?? []) {
    if (!watched.has(widget.name)) continue;
    let proto = widget, accessor;
    while (proto && !(accessor = Object.getOwnPropertyDescriptor(proto, "value"))) proto = Object.getPrototypeOf(proto);
    if (accessor?.set && accessor.configurable !== false) {
      Object.defineProperty(widget, "value", {
        configurable: true,
        enumerable: accessor.enumerable,
        get() { return accessor.get ? accessor.get.call(this) : undefined; },
        set(v) { accessor.set.call(this, v); updateUsedWidgets(node); },
      });
    }
    const callback = widget.callback;
    widget.callback = function () {
      const result = callback?.apply(this, arguments);
      updateUsedWidgets(node);
      return result;
    };
  }
  updateUsedWidgets(node);
}

// ---- registration ---------------------------------------------------------------------------

function addPreview(node) {
  const preview = new Preview(node);
  const widget = node.addDOMWidget(PREVIEW_WIDGET, "anchordiff-preview", preview.root, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => preview.widgetMinHeight(),
  });
  widget.serialize = false;
  node.anchordiffPreview = preview;

  if (node.comfyClass === ANCHOR_SELECT) {
    const reset = node.addWidget("button", RESET_BUTTON, null, () => {
      const manual = node.widgets?.find((w) => w.name === "manual_anchors");
      if (!manual) return;
      manual.value = "";
      preview.reset();
      node.setDirtyCanvas?.(true, true);
    }, { serialize: false });
    reset.serialize = false;
  }
}

let styled = false;
function addStyles() {
  if (styled) return;
  styled = true;
  const link = el("link", "", { rel: "stylesheet", href: new URL("./anchordiff.css", import.meta.url).href });
  document.head.append(link);
}

/** Read Maps: the recorded step and sigma (its `text` output) drawn under the node's sockets; drawn,
 * not a widget, so nothing is added to the saved workflow. */
function showRecordedStep(nodeType) {
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (output) {
    onExecuted?.apply(this, arguments);
    this.anchordiffRecorded = output?.text?.[0] ?? "";
    const height = this.computeSize()[1] + 16;  // room for the line under the sockets
    if (this.size[1] < height) this.setSize([this.size[0], height]);
    this.setDirtyCanvas?.(true, false);
  };
  const onDrawForeground = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function (ctx) {
    onDrawForeground?.apply(this, arguments);
    if (!this.anchordiffRecorded || this.flags?.collapsed) return;
    ctx.save();
    ctx.font = "11px sans-serif";
    ctx.fillStyle = "#9ab";
    ctx.fillText(this.anchordiffRecorded, 8, this.size[1] - 6, this.size[0] - 16);
    ctx.restore();
  };
}

/** The node `id` and every node upstream of it in an API prompt ({id: {class_type, inputs}}), titles
 *  left out: what nodes/common.py made_from() stores with each preview for the prompt it ran. */
export function promptSource(prompt, id) {
  const found = {};
  const todo = [String(id)];
  while (todo.length) {
    const key = todo.pop();
    if (key in found || !prompt?.[key]) continue;
    const inputs = prompt[key].inputs ?? {};
    found[key] = { class_type: prompt[key].class_type, inputs };
    for (const value of Object.values(inputs))
      if (Array.isArray(value) && value.length === 2 && typeof value[0] === "string" && Number.isInteger(value[1])) todo.push(value[0]);
  }
  return found;
}

/** JSON with every object's keys sorted: equal for equal values whatever their key order. */
function canonical(value) {
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  if (value && typeof value === "object")
    return `{${Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
  return JSON.stringify(value);
}

/** Whether a stored preview output was made by exactly what the graph would queue now (`now`: its
 *  API prompt): the node and everything upstream of it, widget values and links. An output without
 *  that record (an older pack's) never matches: a stored picture is shown right or not at all. */
export function madeByGraph(output, now) {
  const info = output?.anchordiff?.[0];
  if (!info?.made_from || !info.node_id || !now?.[info.node_id]) return false;
  return canonical(info.made_from) === canonical(promptSource(now, info.node_id));
}

/** The API prompt the graph would queue now, or null. */
async function promptNow() {
  try {
    return (await app.graphToPrompt()).output;
  } catch {
    return null;
  }
}

/** Show a tab's stored outputs ([node, output] pairs) on the nodes they were made for, each only if the
 *  graph would make the same again (madeByGraph) and no newer picture arrived while the prompt was built. */
async function showStored(pairs) {
  if (!pairs.length) return;
  const shown = pairs.map(([node]) => node.anchordiffPreview.shown);
  const now = await promptNow();
  pairs.forEach(([node, output], i) => {
    if (node.anchordiffPreview.shown === shown[i] && madeByGraph(output, now)) node.anchordiffPreview.show(output);
  });
}

/** The graph's nodes with a preview but no picture (after a page reload the frontend holds no node
 *  outputs): show the newest pictures ComfyUI's /history holds for them that the graph would make
 *  again (madeByGraph). Root graph only. */
async function restoreFromHistory() {
  const graph = app.rootGraph ?? app.graph;
  const empty = () => (graph?.nodes ?? []).filter((n) => n.anchordiffPreview && !n.anchordiffPreview.info);
  if (!empty().length) return;
  let history;
  try {
    const response = await api.fetchApi(`/history?max_items=${HISTORY_ITEMS}`);
    if (!response.ok) return;
    history = Object.values(await response.json()).reverse(); // newest first
  } catch {
    return; // nothing stored to show: the next run brings the pictures
  }
  const now = await promptNow();
  for (const node of empty()) { // the nodes still empty now (a run may have filled some meanwhile)
    const id = String(node.id);
    const entry = history.find((h) => h.outputs?.[id]?.[IMAGES_KEY]?.length && madeByGraph(h.outputs[id], now));
    if (entry) node.anchordiffPreview.show(entry.outputs[id]);
  }
}

const EXTENSION_NAME = "AnchorDiff.Previews";

// ComfyUI serves web/ twice when the pack's folder is not named like the project ("anchordiff"):
// once for WEB_DIRECTORY, once for pyproject's [tool.comfy].web. Register only once.
if (!app.extensions?.some((extension) => extension.name === EXTENSION_NAME)) app.registerExtension({
  name: EXTENSION_NAME,
  settings: [
    {
      id: LEGEND_SETTING,
      category: ["AnchorDiff", "Preview", "Legend"],
      name: "Show the concept colour legend above AnchorDiff previews",
      type: "boolean",
      defaultValue: true,
    },
  ],

  setup() {
    addStyles();
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "AnchorDiffReadMaps") showRecordedStep(nodeType);
    const rules = usedWhen(nodeData);
    if (Object.keys(rules).length) {
      nodeType.anchordiffUsedWhen = rules;
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const result = onConfigure?.apply(this, arguments);
        updateUsedWidgets(this);
        return result;
      };
    }
    if (!PREVIEW_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      this.anchordiffPreview?.show(output);
    };
  },

  nodeCreated(node) {
    watchChoices(node);
    if (!PREVIEW_NODES.has(node.comfyClass)) return;
    addPreview(node);
  },

  // A workflow was loaded (a page reload, a tab, a file): not awaited, so loading does not wait on it.
  afterConfigureGraph() {
    restoreFromHistory();
  },

  // The frontend replaced its stored outputs: a workflow tab shown again, a run loaded from the
  // queue. Our nodes there were created anew, without their pictures: show the stored ones.
  // Only outputs the graph would make again are shown (a template reopened into a tab of the same
  // name must not show that tab's earlier runs).
  onNodeOutputsUpdated(nodeOutputs) {
    const graph = app.canvas?.graph ?? app.graph;
    const pairs = [];
    for (const node of graph?.nodes ?? []) {
      if (!node.anchordiffPreview) continue;
      const output = nodeOutputs?.[graph.isRootGraph === false ? `${graph.id}:${node.id}` : String(node.id)];
      if (output) pairs.push([node, output]);
    }
    showStored(pairs);
  },
});
