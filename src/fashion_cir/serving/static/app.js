// fashion-cir web page: pick a reference (catalog item or upload), describe the change, search,
// click a result to make it the next reference (multi-turn refinement).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { reference: null, history: [], seed: Math.floor(Math.random() * 1e6) };
// state.reference: {kind: "id", id, url, description} or {kind: "upload", file, url, name}

function describe(metadata) {
  if (!metadata) return "";
  return metadata.description || [metadata.color, metadata.category || metadata.label].filter(Boolean).join(" ");
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
  return body;
}

function switchTab(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.tab === name);
  $("view-catalog").hidden = name !== "catalog";
  $("view-results").hidden = name !== "results";
}

function makeCard(item, { score, rank, action }) {
  const card = document.createElement("button");
  card.type = "button";
  card.className = "item";
  card.dataset.id = item.id;
  card.title = `${describe(item.metadata)}\n${action}`;
  const figure = document.createElement("div");
  figure.className = "thumb";
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = describe(item.metadata) || item.id;
  img.src = item.image_url;
  figure.append(img);
  if (rank !== undefined) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = `#${rank}`;
    figure.append(badge);
  }
  const overlay = document.createElement("span");
  overlay.className = "overlay";
  overlay.textContent = action;
  figure.append(overlay);
  const caption = document.createElement("div");
  caption.className = "caption";
  const text = document.createElement("span");
  text.className = "desc";
  text.textContent = describe(item.metadata) || item.id;
  caption.append(text);
  if (score !== undefined) {
    const meter = document.createElement("span");
    meter.className = "score";
    meter.innerHTML = `<span class="bar"><i style="width:${Math.max(0, Math.min(1, score)) * 100}%"></i></span>`;
    meter.append(document.createTextNode(score.toFixed(3)));
    caption.append(meter);
  }
  card.append(figure, caption);
  card.addEventListener("click", () => setReference({ kind: "id", id: item.id, url: item.image_url, description: describe(item.metadata) }));
  return card;
}

function setReference(reference) {
  state.reference = reference;
  const img = $("reference-img");
  img.src = reference.url;
  img.hidden = false;
  $("dropzone-hint").hidden = true;
  $("dropzone").classList.add("filled");
  $("reference-caption").textContent = reference.kind === "id" ? reference.description : `Uploaded: ${reference.name}`;
  showError("");
  const text = $("change-text");
  text.value = "";
  text.focus();
}

function setUpload(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) return showError("Please choose an image file (JPEG, PNG or WebP).");
  setReference({ kind: "upload", file, url: URL.createObjectURL(file), name: file.name });
}

async function loadCatalog() {
  const query = new URLSearchParams({ n: "48", seed: String(state.seed), q: $("filter").value.trim() });
  try {
    const data = await api(`/items?${query}`);
    const grid = $("catalog-grid");
    grid.replaceChildren(...data.items.map((item) => makeCard(item, { action: "Use as reference" })));
    $("catalog-count").textContent = `${data.items.length} of ${data.matched.toLocaleString()} items`;
  } catch (error) {
    showError(`Could not load the catalog: ${error.message}`);
  }
}

function renderHistory() {
  const list = $("history");
  if (!state.history.length) return;
  list.replaceChildren(...state.history.map((step, i) => {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.src = step.url;
    img.alt = "";
    const text = document.createElement("span");
    text.innerHTML = `<b>${i + 1}.</b> `;
    text.append(document.createTextNode(step.text));
    li.append(img, text);
    return li;
  }));
}

async function runSearch(event) {
  event.preventDefault();
  const reference = state.reference;
  const text = $("change-text").value.trim();
  if (!reference) return showError("Pick a reference first: click a catalog item or upload an image.");
  if (!text) return showError("Describe the change you want, e.g. “is red with long sleeves”.");
  const form = new FormData();
  form.append("text", text);
  form.append("k", $("k-select").value);
  if (reference.kind === "id") form.append("id", reference.id);
  else form.append("image", reference.file, reference.name);
  const button = $("search-btn");
  button.disabled = true;
  button.textContent = "Searching…";
  showError("");
  try {
    const data = await api("/search", { method: "POST", body: form });
    state.history.push({ url: reference.url, text });
    renderHistory();
    $("results-summary").innerHTML = "";
    const label = document.createElement("span");
    label.innerHTML = `<b>${data.results.length}</b> results for `;
    const quoteEl = document.createElement("q");
    quoteEl.textContent = data.query_text;
    const took = document.createElement("span");
    took.className = "muted";
    took.textContent = ` · ${data.took_ms} ms · click a result to refine from it`;
    $("results-summary").append(label, quoteEl, took);
    $("results-grid").replaceChildren(...data.results.map((item) => makeCard(item, { score: item.score, rank: item.rank, action: "Refine from this" })));
    $("tab-results").disabled = false;
    switchTab("results");
  } catch (error) {
    showError(error.message);
  } finally {
    button.disabled = false;
    button.textContent = "Search";
  }
}

async function init() {
  try {
    const health = await api("/health");
    $("status").textContent = `${health.items.toLocaleString()} items · ${health.backbone} · ${health.factory}`;
  } catch (error) {
    $("status").textContent = "service unavailable";
  }
  $("search-form").addEventListener("submit", runSearch);
  $("change-text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) runSearch(event);
  });
  $("upload-input").addEventListener("change", (event) => setUpload(event.target.files[0]));
  const zone = $("dropzone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("drag"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("drag"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("drag");
    setUpload(event.dataTransfer.files[0]);
  });
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => switchTab(tab.dataset.tab));
  $("shuffle-btn").addEventListener("click", () => { state.seed += 1; loadCatalog(); });
  let timer;
  $("filter").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(loadCatalog, 250); });
  await loadCatalog();
}

init();
