// The service's own page: the model, a box to try it, and evaluation of a labelled file. Plain JavaScript, loaded
// from this service only (its Content-Security-Policy allows nothing else); every call goes to the documented API.
"use strict";

const KEY = "tuneserve-api-key";
const $ = (id) => document.getElementById(id);
let meta = null;
let chosen = null; // the model picked, where the service serves several (GET /models); every call names it

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function call(path, body, options = {}) {
  if (chosen !== null && body === undefined) path += `${path.includes("?") ? "&" : "?"}model=${encodeURIComponent(chosen)}`;
  if (chosen !== null && body !== undefined) body = { ...body, model: chosen };
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: options.signal,
  });
  if (response.status === 401) {
    askForKey(sessionStorage.getItem(KEY) ? "That key was refused." : "");
    throw new ApiError("this service needs an API key", 401);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new ApiError(message, response.status);
  }
  return options.raw ? response : response.json();
}

function show(id, message) {
  const node = $(id);
  node.textContent = message || "";
  node.hidden = !message;
}

const pct = (p) => `${(100 * p).toFixed(1)}%`;
const fmt = (v) => (typeof v === "number" ? (Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(4)) : String(v));

// -- the API key ------------------------------------------------------------------------------------------------

function askForKey(message) {
  $("key-panel").hidden = false;
  for (const id of ["model", "try", "evaluate"]) $(id).hidden = true;
  show("key-error", message);
  $("key").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value);
  $("key").value = "";
  start();
});

// -- the model --------------------------------------------------------------------------------------------------

function renderModel() {
  $("title").textContent = `${meta.name}: ${meta.task.replace("_", " ")}`;
  document.title = `${meta.name} · tuneserve`;
  const facts = [["Model", meta.model], ["Task", meta.task], ["Base model", meta.base_model],
    ["Method", meta.method], ["Backend", meta.backend], ["Labels", (meta.labels || []).join(", ") || "none"]];
  $("facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  const test = (meta.metrics || {}).test || {};
  const baselines = meta.baselines || {};
  const names = Object.keys(test);
  const table = $("metrics");
  table.querySelectorAll("thead, tbody").forEach((n) => n.remove());
  table.append(el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "metric" }),
    el("th", { scope: "col", text: "this model" }),
    Object.keys(baselines).map((b) => el("th", { scope: "col", text: b })))));
  table.append(el("tbody", {}, names.map((name) => el("tr", { class: name === meta.primary_metric ? "primary" : null },
    el("th", { scope: "row", text: name === meta.primary_metric ? `${name} (primary)` : name }),
    el("td", { text: fmt(test[name]) }),
    Object.values(baselines).map((b) => el("td", { text: name in b ? fmt(b[name]) : "–" }))))));
  $("model").hidden = false;
}

async function renderReport() {
  try {
    const { plots } = await call("/report");
    const figures = [];
    for (const name of plots) {
      const response = await call(`/report/${encodeURIComponent(name)}`, undefined, { raw: true });
      const url = URL.createObjectURL(await response.blob());
      const label = name.replace(/\.png$/, "").replace(/_/g, " ");
      figures.push(el("figure", {}, el("img", { src: url, alt: `Report plot: ${label}` }),
        el("figcaption", { text: label })));
    }
    $("plots").replaceChildren(...(figures.length ? figures : [el("p", { text: "The artifact has no plots." })]));
    const { html } = await call("/card");
    $("card").innerHTML = html; // rendered on the server from the card's markdown, raw HTML escaped
  } catch (error) {
    if (error.status !== 401) $("plots").replaceChildren(el("p", { class: "error", text: error.message }));
  }
}

// -- try it -----------------------------------------------------------------------------------------------------

const ROUTES = { generation: "/generate", embedding: "/rank" };

function setUpTry() {
  const pair = (meta.text_fields || []).length > 1;
  $("pair-box").hidden = !pair;
  $("pair").required = pair;
  $("candidates-box").hidden = meta.task !== "embedding";
  $("candidates").required = meta.task === "embedding";
  const names = { embedding: "Query", generation: "Input", token_classification: "Text" };
  $("text-label").textContent = names[meta.task] || (meta.text_fields || ["Text"])[0];
  if (pair) $("pair-label").textContent = meta.text_fields[1];
  $("run").textContent = meta.task === "generation" ? "Generate" : meta.task === "embedding" ? "Rank" : "Predict";
  $("options-box").hidden = meta.task !== "generation";
  if (meta.task === "generation") {
    $("max-new-tokens").placeholder = String((meta.generation || {}).max_new_tokens || "");
    if ((meta.limits || {}).max_new_tokens) $("max-new-tokens").max = String(meta.limits.max_new_tokens);
  }
  $("try").hidden = false;
}

function bars(scores, decided, thresholds) {
  const rows = Object.entries(scores).sort((a, b) => b[1] - a[1]);
  return el("ul", { class: "bars", "aria-label": "Probability of each label" }, rows.map(([label, p]) => {
    const bar = el("span", { class: "bar" });
    bar.style.width = pct(p);
    const track = el("span", { class: "track", role: "img", "aria-label": `${label}: ${pct(p)}` }, bar);
    const threshold = thresholds ? thresholds[label] : null;
    if (threshold !== null && threshold !== undefined) {
      const mark = el("span", { class: "threshold", title: `threshold ${threshold}` });
      mark.style.left = pct(threshold);
      track.append(mark);
    }
    return el("li", { class: decided.includes(label) ? "chosen" : null },
      el("span", { class: "name", text: label }), track, el("span", { class: "value", text: pct(p) }));
  }));
}

function labelThresholds() {
  const out = {};
  for (const label of meta.labels || []) out[label] = (meta.thresholds || {})[label] ?? meta.threshold ?? 0.5;
  return out;
}

function entitiesView(text, entities) {
  const chars = Array.from(text); // entity offsets count characters (code points), as Python does
  const parts = [];
  let at = 0;
  for (const e of entities) {
    parts.push(chars.slice(at, e.start).join(""));
    parts.push(el("mark", { title: `${e.label} ${e.score.toFixed(2)}`, "data-label": e.label },
      chars.slice(e.start, e.end).join(""), el("span", { class: "sr", text: ` (${e.label})` })));
    at = e.end;
  }
  parts.push(chars.slice(at).join(""));
  return el("p", { class: "entities", "data-testid": "decision" }, parts);
}

async function predict(text, pair) {
  const body = { texts: [text] };
  if (pair) body.text_pairs = [pair];
  const answer = (await call("/predict", body)).predictions[0];
  const note = answer.truncated ? el("p", { class: "note", text: `Only the first ${meta.max_length} tokens were read.` }) : null;
  if (meta.task === "classification") {
    return [el("p", {}, "Label: ", el("strong", { "data-testid": "decision", text: answer.label }), ` (${pct(answer.score)})`),
      bars(answer.scores, [answer.label], null), note];
  }
  if (meta.task === "multilabel") {
    const chips = answer.labels.length ? answer.labels.map((l) => el("span", { class: "chip", text: l })) : [el("span", { text: "none" })];
    return [el("p", {}, "Labels: ", el("span", { "data-testid": "decision", class: "chips" }, chips)),
      bars(answer.scores, answer.labels, labelThresholds()), note];
  }
  if (meta.task === "regression") {
    return [el("p", {}, "Value: ", el("strong", { "data-testid": "decision", text: fmt(answer.value) })), note];
  }
  if (meta.task === "token_classification") {
    return [entitiesView(text, answer.entities),
      el("p", { class: "note", text: `${answer.entities.length} entities; hover one for its type and score.` })];
  }
  return [el("pre", { text: JSON.stringify(answer, null, 2) })];
}

async function rank(query) {
  const candidates = $("candidates").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const { results } = await call("/rank", { query, candidates });
  return [el("ol", { class: "ranked", "data-testid": "decision" }, results.map((r) =>
    el("li", {}, el("span", { class: "value", text: r.score.toFixed(3) }), " ", r.text)))];
}

let streaming = null;

async function generate(text) {
  streaming = new AbortController();
  $("stop").hidden = false;
  const out = el("p", { class: "generated", "data-testid": "decision" });
  const status = el("p", { class: "note", text: "writing…" });
  $("answer").replaceChildren(out, status);
  try {
    const body = { prompts: [text], stream: true };
    const number = (id) => ($(id).value === "" ? null : Number($(id).value));
    if (number("max-new-tokens") !== null) body.max_new_tokens = number("max-new-tokens");
    if (number("temperature")) body.temperature = number("temperature");
    if (number("seed") !== null) body.seed = number("seed");
    const response = await call("/generate", body, { raw: true, signal: streaming.signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
        if (!data || data === "[DONE]") continue;
        const message = JSON.parse(data);
        if (message.text !== undefined) out.append(message.text);
        if (message.finish_reason) status.textContent = `${message.finish_reason} after ${message.tokens} tokens`;
        if (message.error) throw new ApiError(message.error);
      }
    }
  } catch (error) {
    if (error.name === "AbortError") status.textContent = "stopped";
    else throw error;
  } finally {
    streaming = null;
    $("stop").hidden = true;
  }
  return null;
}

$("stop").addEventListener("click", () => { if (streaming) streaming.abort(); });

$("try-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  show("try-error", "");
  const text = $("text").value;
  $("run").disabled = true;
  try {
    let view;
    if (meta.task === "generation") view = await generate(text);
    else if (meta.task === "embedding") view = await rank(text);
    else view = await predict(text, $("pair-box").hidden ? null : $("pair").value);
    if (view) $("answer").replaceChildren(...view.filter(Boolean));
  } catch (error) {
    if (error.status !== 401) show("try-error", error.message);
  } finally {
    $("run").disabled = false;
  }
});

// -- evaluate a file --------------------------------------------------------------------------------------------

function parseCsv(text) {
  const rows = [];
  let row = [], field = "", quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { field += '"'; i++; }
      else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { row.push(field); field = ""; }
    else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i++;
      row.push(field); field = "";
      if (row.length > 1 || row[0] !== "") rows.push(row);
      row = [];
    } else field += c;
  }
  if (field !== "" || row.length) { row.push(field); rows.push(row); }
  const [header, ...body] = rows;
  if (!header) throw new Error("the file is empty");
  return body.map((values, i) => {
    if (values.length !== header.length) throw new Error(`row ${i + 1}: ${values.length} fields, the header has ${header.length}`);
    return Object.fromEntries(header.map((h, j) => [h, values[j]]));
  });
}

function parseJsonl(text) {
  return text.split(/\r?\n/).map((line, i) => [line, i]).filter(([line]) => line.trim()).map(([line, i]) => {
    let row;
    try { row = JSON.parse(line); } catch (_) { throw new Error(`line ${i + 1}: not valid JSON`); }
    if (typeof row !== "object" || row === null || Array.isArray(row)) throw new Error(`line ${i + 1}: not a JSON object`);
    return row;
  });
}

function toExample(row, i) {
  const [textField, pairField] = meta.text_fields;
  const example = {};
  if (Array.isArray(row[textField])) example.tokens = row[textField];
  else if (row[textField] !== undefined) example.text = String(row[textField]);
  else throw new Error(`row ${i + 1}: no column ${textField}`);
  if (pairField) example.text_pair = String(row[pairField] ?? "");
  const truth = row[meta.label_field];
  if (truth === undefined || truth === null || truth === "") throw new Error(`row ${i + 1}: no ${meta.label_field}`);
  let key = meta.label_key;
  if (key === "entities" && Array.isArray(truth) && typeof truth[0] === "string") key = "tags";
  let value = truth;
  if (meta.task === "regression" && typeof truth === "string") value = Number(truth);
  if (meta.task === "multilabel" && typeof truth === "string") {
    value = truth.split(meta.label_delimiter || "|").map((s) => s.trim()).filter(Boolean);
  }
  example[key] = value;
  return example;
}

// Examples as parts of one evaluation, each within the service's limits (examples and bytes per request): the last
// part's answer is the report of all of them, exactly as one request would give it (service/parts.py).
function parts(examples) {
  const limits = meta.limits || {};
  let most = Math.min(limits.max_examples || 256, 1000); // parts of at most 1,000: the progress bar moves
  if (meta.task === "embedding") most = limits.max_examples || 256; // ranked within one request: one part only
  const newTokens = (meta.generation || {}).max_new_tokens;
  if (meta.task === "generation" && limits.max_request_tokens && newTokens) {
    // each prompt costs its own tokens and max_new_tokens of the request's token budget: room for half of it
    most = Math.min(most, Math.floor(limits.max_request_tokens / (2 * newTokens)));
  }
  most = Math.max(1, most);
  const budget = (limits.max_body_bytes || 1048576) - 4096; // room for the request's own fields
  const encoder = new TextEncoder();
  const out = [];
  let part = [], bytes = 0;
  for (const example of examples) {
    const size = encoder.encode(JSON.stringify(example)).length + 1;
    if (part.length && (part.length >= most || bytes + size > budget)) { out.push(part); part = []; bytes = 0; }
    part.push(example);
    bytes += size;
  }
  out.push(part);
  return out;
}

// A table that may scroll sideways on a narrow screen: a region the keyboard can reach.
const scroller = (label, table) => el("div", { class: "scroll", tabindex: "0", role: "region", "aria-label": label }, table);

function reportView(report, examples) {
  const names = Object.keys(report.metrics);
  const rows = names.map((name) => {
    const interval = (report.intervals || {})[name];
    const training = (report.training_metrics || {})[name];
    const drift = (report.drift || []).includes(name);
    return el("tr", { class: drift ? "drift" : null },
      el("th", { scope: "row", text: name }), el("td", { "data-metric": name, text: fmt(report.metrics[name]) }),
      el("td", { text: interval ? `${fmt(interval[0])} – ${fmt(interval[1])}` : "–" }),
      el("td", { text: training === undefined ? "–" : fmt(training) }),
      el("td", { text: drift ? "drift" : "" }));
  });
  const parts = [
    el("p", { text: `${report.n} examples` }),
    scroller("Metrics on the file", el("table", { id: "eval-metrics" },
      el("caption", { class: "sr", text: "Metrics on the file beside training's" }),
      el("thead", {}, el("tr", {}, ["metric", "this file", "95% interval", "at training (test)", ""]
        .map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, rows))),
  ];
  if (report.confusion_matrix && meta.labels) parts.push(heatmap(report.confusion_matrix));
  if (report.per_class) {
    parts.push(scroller("Per class", el("table", {}, el("caption", { text: "Per class" }),
      el("thead", {}, el("tr", {}, ["label", "precision", "recall", "f1", "support"].map((h) => el("th", { scope: "col", text: h })))),
      el("tbody", {}, Object.entries(report.per_class).map(([label, v]) => el("tr", {}, el("th", { scope: "row", text: label }),
        ["precision", "recall", "f1", "support"].map((k) => el("td", { text: v[k] === undefined ? "–" : k === "support" ? String(v[k]) : fmt(v[k]) }))))))));
  }
  if (report.worst && report.worst.examples.length) parts.push(worstView(report.worst, examples));
  for (const note of report.notes || []) parts.push(el("p", { class: "note", text: note }));
  const blob = new Blob([JSON.stringify(report, null, 2)], { type: "application/json" });
  parts.push(el("a", { href: URL.createObjectURL(blob), download: `${meta.name}-evaluation.json`, text: "Download the report (JSON)" }));
  return parts;
}

// How the page shows an example's truth or a decision, per task.
function shown(value, text) {
  if (value === null || value === undefined) return "–";
  if (Array.isArray(value) && value.length && typeof value[0] === "object") {
    const chars = Array.from(text || ""); // entities: offsets in characters
    return value.map((e) => `${chars.slice(e.start, e.end).join("")} (${e.label})`).join(", ");
  }
  if (Array.isArray(value)) return value.join(", ") || "none";
  return typeof value === "number" ? fmt(value) : String(value);
}

function worstView(worst, examples) {
  const truthKey = ["label", "labels", "entities", "tags", "reference"];
  const clip = (t) => (t.length > 200 ? `${t.slice(0, 200)}…` : t);
  return scroller("Worst examples", el("table", { id: "worst" },
    el("caption", { text: `The examples answered worst (by ${worst.by})` }),
    el("thead", {}, el("tr", {}, ["row", "text", "truth", "prediction", "loss"].map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, worst.examples.map((w) => {
      const example = examples[w.index];
      const text = example.text ?? example.input ?? (example.tokens || []).join(" ");
      const truth = example[truthKey.find((k) => example[k] !== undefined)];
      return el("tr", {}, el("th", { scope: "row", text: String(w.index + 1) }), el("td", { text: clip(text) }),
        el("td", { text: shown(truth, text) }), el("td", { text: shown(w.prediction, text) }), el("td", { text: fmt(w.loss) }));
    }))));
}

function heatmap(matrix) {
  const top = Math.max(1, ...matrix.flat());
  return scroller("Confusion matrix", el("table", { class: "heatmap" },
    el("caption", { text: "Confusion matrix: rows are the true labels, columns the predicted" }),
    el("thead", {}, el("tr", {}, el("td"), meta.labels.map((l) => el("th", { scope: "col", text: l })))),
    el("tbody", {}, matrix.map((row, i) => el("tr", {}, el("th", { scope: "row", text: meta.labels[i] }), row.map((count) => {
      const cell = el("td", { text: count });
      cell.style.setProperty("--heat", (count / top).toFixed(3));
      if (count / top > 0.45) cell.classList.add("hot"); // light text on the darker cells
      return cell;
    }))))));
}

$("file").addEventListener("change", async () => {
  const file = $("file").files[0];
  if (!file) return;
  show("evaluate-error", "");
  $("report").replaceChildren();
  const progress = $("progress");
  try {
    const text = await file.text();
    const rows = /\.csv$/i.test(file.name) ? parseCsv(text) : parseJsonl(text);
    if (!rows.length) throw new Error("the file holds no rows");
    const examples = rows.map(toExample);
    const split = parts(examples);
    if (split.length > 1 && meta.task === "embedding") {
      throw new Error(`${examples.length} examples: an embedding model ranks all of a file's queries against all its `
        + `documents in one request, at most ${split[0].length} examples here`);
    }
    // getRandomValues, not randomUUID: the page may be served over plain HTTP, where randomUUID is missing
    const id = Array.from(crypto.getRandomValues(new Uint8Array(12)), (b) => b.toString(16).padStart(2, "0")).join("");
    progress.hidden = false;
    progress.max = examples.length;
    progress.value = 0;
    let report = null;
    for (const [index, part] of split.entries()) {
      const body = { examples: part };
      if (split.length > 1) body.part = { id, index, last: index === split.length - 1 };
      report = await call("/evaluate", body);
      progress.value += part.length;
    }
    $("report").replaceChildren(...reportView(report, examples));
  } catch (error) {
    if (error.status !== 401) show("evaluate-error", `${file.name}: ${error.message}`);
  } finally {
    progress.hidden = true;
  }
});

// -- start ------------------------------------------------------------------------------------------------------

// Several models served: a picker, and every call names the one picked.
function setUpPicker(models) {
  if (models.length < 2) return;
  if (chosen === null || !models.some((m) => m.name === chosen)) chosen = models[0].name;
  $("picker").replaceChildren(...models.map((m) => el("option", { value: m.name, selected: m.name === chosen || null,
    text: `${m.name} (${m.task.replace("_", " ")})` })));
  $("picker-box").hidden = false;
}

$("picker").addEventListener("change", () => {
  chosen = $("picker").value;
  for (const id of ["answer", "report", "plots", "card"]) $(id).replaceChildren();
  for (const id of ["try-error", "evaluate-error"]) show(id, "");
  start();
});

async function start() {
  try {
    const listing = chosen === null ? (await call("/models")).models : null;
    if (listing) setUpPicker(listing);
    meta = await call("/metadata");
  } catch (error) {
    if (error.status !== 401) show("key-error", error.message);
    return;
  }
  $("key-panel").hidden = true;
  renderModel();
  setUpTry();
  $("evaluate").hidden = false;
  renderReport();
}

start();
