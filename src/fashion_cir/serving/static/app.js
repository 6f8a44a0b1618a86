// fashion-cir web page: pick a reference (catalog item or upload), describe the change, search;
// click a result to refine from it. The steps form one chain per session; the current step
// (reference, text, filters) lives in the URL, so a search can be shared and survives a reload.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 24;
const ATTRIBUTE_ORDER = ["category", "color", "pattern", "sleeves", "neckline", "length", "material"];
const FACETS = [["category", "Type"], ["color", "Colour"]];
const STORE = "fashion-cir:";

const state = {
  reference: null, // {kind: "id", id, url, description} or {kind: "upload", key, url, name}
  steps: [], // the chain: [{ref, text, filters, sameType, similar}]
  current: -1, // the step on screen
  results: [],
  more: false,
  busy: false,
  lastRequest: null,
  uploads: new Map(), // key -> {file, url, name}
  timeoutMs: 15000,
  seed: 0, // the catalog sample's seed (Shuffle adds one); chosen in init
  linkSeed: null, // a ?seed=N the page was opened with: kept in the address as the page changes it
};

// -- helpers -------------------------------------------------------------------------------------
function describe(metadata) {
  if (!metadata) return "";
  return metadata.description || [metadata.color, metadata.category || metadata.label].filter(Boolean).join(" ");
}

function value(entry) {
  return entry && typeof entry === "object" ? entry.value : entry;
}

function keyAttributes(attributes) {
  if (!attributes) return "";
  return ATTRIBUTE_ORDER.map((name) => value(attributes[name]))
    .filter((v) => v && !["none", "unknown", "other"].includes(v)).join(" · ");
}

function sentence(text) {
  const clean = String(text || "").trim();
  if (!clean) return "";
  const capital = clean[0].toUpperCase() + clean.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

function seconds(ms) {
  const n = Math.round(ms / 1000);
  return `${n} second${n === 1 ? "" : "s"}`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(message, retry) {
  $("error-text").textContent = message || "";
  $("error").hidden = !message;
  $("retry-btn").hidden = !retry;
}

class Timeout extends Error {}

async function api(path, options = {}, timeoutMs) {
  const controller = new AbortController();
  const timer = timeoutMs ? setTimeout(() => controller.abort(), timeoutMs) : null;
  let response;
  try {
    response = await fetch(path, { ...options, signal: controller.signal });
  } catch (error) {
    if (controller.signal.aborted) throw new Timeout();
    throw new Error("The search service could not be reached. Check your connection and try again.");
  } finally {
    clearTimeout(timer);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && typeof body.detail === "string" ? body.detail : "";
    if (response.status >= 500) throw new Error(sentence(`The search service had a problem (error ${response.status})${detail ? `: ${detail}` : ""}`) + " Please try again.");
    throw new Error(sentence(detail || `The request was refused (error ${response.status})`));
  }
  return body;
}

function switchTab(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    const active = tab.dataset.tab === name;
    tab.classList.toggle("active", active);
    tab.setAttribute("aria-selected", String(active));
    tab.tabIndex = active ? 0 : -1;
  }
  $("view-catalog").hidden = name !== "catalog";
  $("view-results").hidden = name !== "results";
}

// -- URL and session -----------------------------------------------------------------------------
function stepToQuery(step) {
  const query = new URLSearchParams();
  if (step.ref.kind === "id") query.set("ref", step.ref.id);
  else query.set("upload", step.ref.key);
  if (step.text) query.set("text", step.text);
  for (const [name] of FACETS) for (const v of step.filters[name] || []) query.append(name, v);
  query.set("same", step.sameType ? "1" : "0");
  if (step.similar) query.set("similar", "1");
  return query;
}

function stepFromQuery(query) {
  const ref = query.get("ref") ? { kind: "id", id: query.get("ref"), url: `/images/${encodeURIComponent(query.get("ref"))}` }
    : query.get("upload") ? restoreUpload(query.get("upload")) : null;
  if (!ref) return null;
  const filters = {};
  for (const [name] of FACETS) if (query.getAll(name).length) filters[name] = query.getAll(name);
  return { ref, text: query.get("text") || "", filters, sameType: query.get("same") !== "0", similar: query.get("similar") === "1" };
}

// The catalog sample is drawn by the server from a seed: ?seed=N in the address, else the server's
// `serve --sample-seed`, else a random one (a new sample on each visit).
function parseSeed(text) {
  return /^\d{1,9}$/.test(String(text ?? "")) ? Number(text) : null;
}

function pageUrl(query) {
  if (state.linkSeed !== null) query.set("seed", String(state.linkSeed));
  const search = query.toString();
  return search ? `${location.pathname}?${search}` : location.pathname;
}

function sameStep(a, b) {
  return stepToQuery(a).toString() === stepToQuery(b).toString();
}

function saveSession() {
  const steps = state.steps.map((s) => ({ ...s, ref: { ...s.ref, file: undefined } }));
  try { sessionStorage.setItem(STORE + "steps", JSON.stringify({ steps, current: state.current })); } catch (_) { /* storage full: the URL still holds the step */ }
}

function loadSession() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(STORE + "steps") || "null");
    if (saved && Array.isArray(saved.steps)) {
      state.steps = saved.steps.map((s) => (s.ref.kind === "upload" ? { ...s, ref: restoreUpload(s.ref.key) || s.ref } : s));
      state.current = saved.current;
    }
  } catch (_) { state.steps = []; }
}

function dataUrlToFile(dataUrl, name) {
  const [head, body] = dataUrl.split(",");
  const mime = head.match(/data:(.*?);/)[1];
  const bytes = Uint8Array.from(atob(body), (c) => c.charCodeAt(0));
  return new File([bytes], name, { type: mime });
}

function restoreUpload(key) {
  if (state.uploads.has(key)) return { kind: "upload", key, ...state.uploads.get(key) };
  try {
    const saved = JSON.parse(sessionStorage.getItem(STORE + "upload:" + key) || "null");
    if (!saved) return null;
    const file = dataUrlToFile(saved.data, saved.name);
    state.uploads.set(key, { file, url: URL.createObjectURL(file), name: saved.name });
    renderUploads();
    return { kind: "upload", key, ...state.uploads.get(key) };
  } catch (_) { return null; }
}

function rememberUpload(key, file) {
  const reader = new FileReader();
  reader.onload = () => {
    try { sessionStorage.setItem(STORE + "upload:" + key, JSON.stringify({ name: file.name, data: reader.result })); } catch (_) { /* too large for session storage: kept in memory */ }
    const keys = JSON.parse(sessionStorage.getItem(STORE + "uploads") || "[]");
    if (!keys.includes(key)) keys.push(key);
    try { sessionStorage.setItem(STORE + "uploads", JSON.stringify(keys)); } catch (_) { /* ignore */ }
  };
  reader.readAsDataURL(file);
}

// -- reference -----------------------------------------------------------------------------------
function showReference(reference, attributes) {
  state.reference = reference;
  const img = $("reference-img");
  img.src = reference.url;
  img.alt = reference.kind === "id" ? (reference.description || "the reference item") : `your photo ${reference.name}`;
  img.hidden = false;
  $("dropzone-hint").hidden = true;
  $("dropzone").classList.add("filled");
  $("upload-another").hidden = false;
  $("reference-caption").textContent = reference.kind === "id" ? (reference.description || reference.id) : `Your photo: ${reference.name}`;
  $("reference-attributes").textContent = attributes ? keyAttributes(attributes) : "";
  for (const button of document.querySelectorAll("#uploads button")) {
    button.setAttribute("aria-pressed", String(reference.kind === "upload" && button.dataset.key === reference.key));
  }
}

function setReference(reference, { continueChain = false } = {}) {
  if (!continueChain && state.steps.length) startOver({ keepReference: true });
  showReference(reference);
  showError("");
  const text = $("change-text");
  text.value = "";
  text.focus();
}

function renderUploads() {
  const box = $("uploads");
  box.replaceChildren(...[...state.uploads.entries()].map(([key, upload]) => {
    const button = el("button", "upload-thumb");
    button.type = "button";
    button.dataset.key = key;
    button.setAttribute("aria-label", `Use your photo ${upload.name}`);
    const img = el("img");
    img.src = upload.url;
    img.alt = "";
    button.append(img);
    button.addEventListener("click", () => setReference({ kind: "upload", key, ...upload }));
    return button;
  }));
  box.hidden = state.uploads.size === 0;
}

function setUpload(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) return showError("Please choose an image file (JPEG, PNG or WebP).");
  const key = `u${Date.now().toString(36)}${Math.floor(Math.random() * 1e4)}`;
  state.uploads.set(key, { file, url: URL.createObjectURL(file), name: file.name });
  rememberUpload(key, file);
  renderUploads();
  setReference({ kind: "upload", key, ...state.uploads.get(key) });
}

// -- catalog -------------------------------------------------------------------------------------
function itemCard(item, { rank, score, match, chooseLabel, moreLike }) {
  const card = el("article", "item");
  card.dataset.id = item.id;
  const choose = el("button", "choose");
  choose.type = "button";
  choose.setAttribute("aria-label", `${chooseLabel}: ${describe(item.metadata) || item.id}`);
  const figure = el("div", "thumb");
  const img = el("img");
  img.loading = "lazy";
  img.alt = "";
  img.src = item.image_url;
  figure.append(img);
  if (rank !== undefined) figure.append(el("span", "badge", `#${rank}`));
  figure.append(el("span", "overlay", chooseLabel));
  choose.append(figure);
  choose.addEventListener("click", () => {
    const reference = { kind: "id", id: item.id, url: item.image_url, description: describe(item.metadata) };
    setReference(reference, { continueChain: rank !== undefined });
  });
  const caption = el("div", "caption");
  caption.append(el("span", "desc", describe(item.metadata) || item.id));
  const attributes = keyAttributes(item.metadata);
  if (attributes) caption.append(el("span", "attrs", attributes));
  if (match) {
    const why = el("div", "why");
    for (const change of match.satisfied) why.append(el("span", "ok", `✓ ${change}`));
    for (const change of match.missed) why.append(el("span", "miss", `✗ ${change}`));
    if (match.kept.length) why.append(el("span", "kept", `kept: ${match.kept.join(", ")}`));
    if (why.childNodes.length) caption.append(why);
  }
  if (moreLike) {
    const actions = el("div", "actions");
    const like = el("button", "small-button more-like", "More like this");
    like.type = "button";
    like.addEventListener("click", () => moreLikeThis(item));
    actions.append(like);
    caption.append(actions);
  }
  if (score !== undefined) {
    const details = el("details", "details");
    details.append(el("summary", "", "Details"));
    details.append(el("p", "score", `Similarity ${score.toFixed(3)} (higher is closer; rank ${rank})`));
    details.append(el("p", "muted", `Item ${item.id}`));
    caption.append(details);
  }
  card.append(choose, caption);
  return card;
}

async function loadCatalog() {
  const query = new URLSearchParams({ n: "48", seed: String(state.seed), q: $("filter").value.trim() });
  try {
    const data = await api(`/items?${query}`, {}, state.timeoutMs);
    $("catalog-grid").replaceChildren(...data.items.map((item) => itemCard(item, { chooseLabel: "Use as reference" })));
    $("catalog-count").textContent = `${data.items.length} of ${data.matched.toLocaleString()} items`;
  } catch (error) {
    showError(error instanceof Timeout ? "The catalog took too long to load. Please try again." : `The catalog could not be loaded. ${error.message}`);
  }
}

// -- steps ---------------------------------------------------------------------------------------
function renderHistory() {
  const list = $("history");
  $("start-over").hidden = state.steps.length === 0;
  if (!state.steps.length) {
    list.replaceChildren(el("li", "muted", "Each search appears here; click a result to refine from it, click a step to go back to it."));
    return;
  }
  list.replaceChildren(...state.steps.map((step, i) => {
    const li = el("li");
    const button = el("button", "step");
    button.type = "button";
    if (i === state.current) button.setAttribute("aria-current", "step");
    const img = el("img");
    img.src = step.ref.url;
    img.alt = "";
    const label = step.similar ? "More like this" : `“${step.text}”`;
    const filters = Object.values(step.filters || {}).flat();
    button.append(img, el("span", "", `${i + 1}. ${label}${filters.length ? ` · only ${filters.join(", ")}` : ""}`));
    button.addEventListener("click", () => goToStep(i));
    li.append(button);
    return li;
  }));
}

function startOver({ keepReference = false } = {}) {
  state.steps = [];
  state.current = -1;
  state.results = [];
  saveSession();
  renderHistory();
  renderActiveFilters({});
  history.pushState(null, "", pageUrl(new URLSearchParams()));
  if (!keepReference) {
    state.reference = null;
    $("reference-img").hidden = true;
    $("dropzone-hint").hidden = false;
    $("dropzone").classList.remove("filled");
    $("reference-caption").textContent = "";
    $("reference-attributes").textContent = "";
    $("change-text").value = "";
    $("results-grid").replaceChildren();
    $("tab-results").disabled = true;
    switchTab("catalog");
  }
}

function goToStep(i) {
  if (state.busy) return;
  state.current = i;
  loadStep(state.steps[i]);
  runStep(state.steps[i], { push: true, record: false });
}

function loadStep(step) {
  showReference(step.ref);
  $("change-text").value = step.text;
  $("same-type").checked = step.sameType;
  renderActiveFilters(step.filters);
}

function currentFilters() {
  const step = state.steps[state.current];
  return step ? JSON.parse(JSON.stringify(step.filters || {})) : {};
}

function renderActiveFilters(filters) {
  const box = $("active-filters");
  box.replaceChildren();
  for (const [name, label] of FACETS) {
    for (const v of (filters && filters[name]) || []) {
      const chip = el("button", "chip active", `${label}: ${v} ×`);
      chip.type = "button";
      chip.setAttribute("aria-label", `Remove the filter ${label} ${v}`);
      chip.addEventListener("click", () => {
        const next = currentFilters();
        next[name] = (next[name] || []).filter((x) => x !== v);
        if (!next[name].length) delete next[name];
        searchWith({ filters: next });
      });
      box.append(chip);
    }
  }
}

// -- search --------------------------------------------------------------------------------------
function requestFor(step, offset) {
  const form = new FormData();
  form.append("text", step.similar ? "" : step.text);
  form.append("k", String(PAGE));
  form.append("offset", String(offset));
  if (step.similar) form.append("similar", "true");
  form.append("same_type", step.sameType ? "true" : "false");
  for (const [name] of FACETS) for (const v of (step.filters || {})[name] || []) form.append(name, v);
  if (step.ref.kind === "id") form.append("id", step.ref.id);
  else form.append("image", step.ref.file, step.ref.name);
  return form;
}

function searchWith(changes) {
  const base = state.steps[state.current];
  if (!base || state.busy) return;
  const step = { ...base, ...changes };
  runStep(step, { push: true, record: true });
}

function runSearch(event) {
  if (event) event.preventDefault();
  if (state.busy) return; // one search at a time: a second Enter is ignored
  const reference = state.reference;
  const text = $("change-text").value.trim();
  if (!reference) return showError("Pick a reference first: click a catalog item or upload a photo.");
  if (!text) return showError("Describe the change you want, e.g. “is red with long sleeves”.");
  if (reference.kind === "upload" && !reference.file) return showError("That photo is no longer available in this session. Please upload it again.");
  const step = { ref: reference, text, filters: currentFilters(), sameType: $("same-type").checked, similar: false };
  runStep(step, { push: true, record: true });
}

function moreLikeThis(item) {
  if (state.busy) return;
  const ref = { kind: "id", id: item.id, url: item.image_url, description: describe(item.metadata) };
  showReference(ref);
  runStep({ ref, text: "", filters: {}, sameType: $("same-type").checked, similar: true }, { push: true, record: true });
}

async function runStep(step, { push, record, offset = 0 }) {
  if (state.busy) return;
  state.busy = true;
  state.lastRequest = { step, push, record, offset };
  const button = $("search-btn");
  button.disabled = true;
  button.textContent = "Searching…";
  $("results-grid").classList.add("stale");
  $("load-more").disabled = true;
  showError("");
  try {
    const data = await api("/search", { method: "POST", body: requestFor(step, offset) }, state.timeoutMs);
    if (record) {
      const existing = state.steps.findIndex((s) => sameStep(s, step));
      if (existing >= 0 && existing === state.current) {
        // the same search again: stays one step
      } else {
        state.steps = state.steps.slice(0, state.current + 1); // going on from an earlier step starts a new branch
        state.steps.push(step);
        state.current = state.steps.length - 1;
      }
    }
    const url = pageUrl(stepToQuery(step));
    if (push && `${location.pathname}${location.search}` !== url) history.pushState(null, "", url);
    else history.replaceState(null, "", url);
    saveSession();
    renderHistory();
    showResults(step, data, offset);
  } catch (error) {
    const message = error instanceof Timeout
      ? `The search took longer than ${seconds(state.timeoutMs)} and was stopped. The service may be busy; please try again.`
      : error.message;
    showError(message, true);
  } finally {
    state.busy = false;
    button.disabled = false;
    button.textContent = "Search";
    $("results-grid").classList.remove("stale");
    $("load-more").disabled = false;
  }
}

function showResults(step, data, offset) {
  state.results = offset ? state.results.concat(data.results) : data.results;
  state.more = data.more;
  if (!offset) {
    showReference(step.ref, data.reference_attributes);
    renderActiveFilters(data.filters);
  }
  const summary = $("results-summary");
  summary.replaceChildren();
  summary.append(el("b", "", `${state.results.length}${data.more ? "+" : ""}`), document.createTextNode(state.results.length === 1 ? " result" : " results"));
  if (data.query_text) {
    summary.append(document.createTextNode(" for "));
    summary.append(el("q", "", data.query_text));
  } else {
    summary.append(document.createTextNode(" that look like the reference"));
  }
  if (data.prompt && ["predicted", "captioned"].includes(data.prompt.source)) summary.append(el("span", "muted", " (your photo described automatically)"));
  const cards = data.results.map((item) => itemCard(item, { rank: item.rank, score: item.score, match: item.match, chooseLabel: "Refine from this", moreLike: true }));
  if (offset) $("results-grid").append(...cards);
  else $("results-grid").replaceChildren(...cards);
  if (!state.results.length) $("results-grid").replaceChildren(el("p", "muted", "Nothing matches these filters. Remove a filter or turn off “Same type as the reference”."));
  renderFacets();
  $("load-more").hidden = !data.more;
  $("tab-results").disabled = false;
  switchTab("results");
  if (!offset && window.innerWidth < 760) scrollToResults();
}

// On a phone the results go to the top of the screen, again whenever an image above them finishes
// loading in the next few seconds (its height moves them down).
function scrollToResults() {
  const results = $("view-results");
  const until = Date.now() + 4000;
  const go = () => { if (Date.now() < until) results.scrollIntoView({ block: "start" }); };
  requestAnimationFrame(go);
  for (const img of document.querySelectorAll("img")) {
    if (!img.complete && img.compareDocumentPosition(results) & Node.DOCUMENT_POSITION_FOLLOWING) {
      img.addEventListener("load", go, { once: true });
    }
  }
}

function renderFacets() {
  const box = $("facets");
  box.replaceChildren();
  const active = currentFilters();
  for (const [name, label] of FACETS) {
    const counts = new Map();
    for (const item of state.results) {
      const v = item.metadata && item.metadata[name];
      if (v) counts.set(v, (counts.get(v) || 0) + 1);
    }
    if (counts.size < 2 || (active[name] || []).length) continue;
    const group = el("div", "facet-group");
    group.append(el("span", "facet-label", `${label}:`));
    for (const [v, count] of [...counts.entries()].sort((a, b) => b[1] - a[1])) {
      const chip = el("button", "chip", `${v} (${count})`);
      chip.type = "button";
      chip.dataset.facet = name;
      chip.dataset.value = v;
      chip.setAttribute("aria-label", `Only ${v} (${count} of these results)`);
      chip.addEventListener("click", () => {
        const filters = { ...active, [name]: [v] };
        const changes = { filters };
        if (name === "category") { changes.sameType = false; $("same-type").checked = false; }
        searchWith(changes);
      });
      group.append(chip);
    }
    box.append(group);
  }
}

function loadMore() {
  const step = state.steps[state.current];
  if (step) runStep(step, { push: false, record: false, offset: state.results.length });
}

// -- start ---------------------------------------------------------------------------------------
async function restoreFromUrl() {
  const step = stepFromQuery(new URLSearchParams(location.search));
  if (!step) return;
  if (step.ref.kind === "id") {
    try {
      const item = await api(`/items/${encodeURIComponent(step.ref.id)}`, {}, state.timeoutMs);
      step.ref.description = describe(item.metadata);
    } catch (error) { return showError(`The reference in this link could not be found. ${error.message}`); }
  }
  const index = state.steps.findIndex((s) => sameStep(s, step));
  if (index >= 0) state.current = index;
  else { state.steps = [step]; state.current = 0; }
  loadStep(step);
  await runStep(step, { push: false, record: false });
}

async function init() {
  state.linkSeed = parseSeed(new URLSearchParams(location.search).get("seed"));
  let serverSeed = null;
  try {
    const health = await api("/health", {}, 15000);
    $("status").textContent = `${health.items.toLocaleString()} items`;
    if (health.page && health.page.search_timeout_ms) state.timeoutMs = health.page.search_timeout_ms;
    if (health.page) serverSeed = parseSeed(health.page.sample_seed);
  } catch (error) {
    $("status").textContent = "search service unavailable";
  }
  state.seed = state.linkSeed ?? serverSeed ?? Math.floor(Math.random() * 1e6);
  $("search-form").addEventListener("submit", runSearch);
  $("change-text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) runSearch(event);
  });
  $("upload-input").addEventListener("change", (event) => { setUpload(event.target.files[0]); event.target.value = ""; });
  const zone = $("dropzone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("drag"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("drag"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("drag");
    setUpload(event.dataTransfer.files[0]);
  });
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => switchTab(tab.dataset.tab));
  $("tab-results").parentElement.addEventListener("keydown", (event) => {
    if (!["ArrowLeft", "ArrowRight"].includes(event.key)) return;
    const tabs = [...document.querySelectorAll(".tab:not(:disabled)")];
    const next = tabs[(tabs.indexOf(document.activeElement) + 1) % tabs.length];
    if (next) { next.focus(); switchTab(next.dataset.tab); }
  });
  $("shuffle-btn").addEventListener("click", () => { state.seed += 1; loadCatalog(); });
  $("retry-btn").addEventListener("click", () => { if (state.lastRequest) runStep(state.lastRequest.step, state.lastRequest); });
  $("start-over").addEventListener("click", () => startOver());
  $("load-more").addEventListener("click", loadMore);
  $("same-type").addEventListener("change", () => { if (state.steps.length) searchWith({ sameType: $("same-type").checked }); });
  window.addEventListener("popstate", () => {
    const step = stepFromQuery(new URLSearchParams(location.search));
    if (!step) return;
    const index = state.steps.findIndex((s) => sameStep(s, step));
    if (index >= 0) state.current = index;
    loadStep(step);
    runStep(step, { push: false, record: false });
  });
  let timer;
  $("filter").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(loadCatalog, 250); });
  loadSession();
  for (const key of JSON.parse(sessionStorage.getItem(STORE + "uploads") || "[]")) restoreUpload(key);
  renderHistory();
  await Promise.all([loadCatalog(), restoreFromUrl()]);
}

init();
