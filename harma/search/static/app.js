// The search page: plain JavaScript, no build step. Every text from the server is set with
// textContent (never as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { index: null, k: 10 };

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

async function call(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function render(answer, description) {
  const grid = $("results");
  grid.replaceChildren();
  answer.results.forEach((result, position) => {
    const card = document.createElement("button");
    card.className = "result";
    card.type = "button";
    card.dataset.id = result.id;
    card.title = `${result.path}: click to find similar images`;
    const image = document.createElement("img");
    image.src = result.thumb;
    image.alt = result.path;
    image.loading = "lazy";
    const meta = document.createElement("span");
    meta.className = "meta";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = result.score.toFixed(3);
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${position + 1} · id ${result.id}`;
    const caption = document.createElement("span");
    caption.className = "caption";
    caption.textContent = (result.captions && result.captions[0]) || result.label || result.path;
    meta.append(score, rank, caption);
    card.append(image, meta);
    card.addEventListener("click", () => searchItem(result.id, result.path));
    grid.append(card);
  });
  setStatus(`${answer.results.length} results for ${description} in ${answer.index} (${answer.took_ms} ms)`);
}

function params(extra) {
  const query = new URLSearchParams({ k: state.k, index: state.index, ...extra });
  return query.toString();
}

async function searchText(text) {
  if (!text.trim()) { setStatus("Type a description first.", true); return; }
  setStatus("Searching…");
  try {
    render(await call(`/api/search?${params({ text })}`), `"${text}"`);
  } catch (error) { setStatus(error.message, true); }
}

async function searchItem(id, path) {
  setStatus("Searching…");
  try {
    render(await call(`/api/search?${params({ item: id })}`), `images like ${path}`);
  } catch (error) { setStatus(error.message, true); }
}

async function searchImage(file) {
  if (!file) return;
  setStatus(`Uploading ${file.name}…`);
  const form = new FormData();
  form.append("image", file);
  form.append("k", state.k);
  form.append("index", state.index);
  try {
    render(await call("/api/search", { method: "POST", body: form }), `the image ${file.name}`);
  } catch (error) { setStatus(error.message, true); }
}

async function loadIndexes() {
  try {
    const answer = await call("/api/indexes");
    const select = $("index");
    for (const entry of answer.indexes) {
      const option = document.createElement("option");
      option.value = entry.name;
      option.textContent = `${entry.name} (${entry.count} images)`;
      select.append(option);
    }
    state.index = answer.indexes[0].name;
    $("about").textContent = answer.indexes.map((e) => `${e.name}: ${e.model}; ${e.search} search`).join(" · ");
    setStatus("Ready: type a description, or drop an image.");
  } catch (error) { setStatus(error.message, true); }
}

function wire() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    searchText($("query").value);
  });
  $("index").addEventListener("change", (event) => { state.index = event.target.value; });
  $("k").addEventListener("change", (event) => { state.k = Number(event.target.value); });
  $("upload").addEventListener("change", (event) => searchImage(event.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    searchImage(event.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter") $("upload").click(); });
  loadIndexes();
}

document.addEventListener("DOMContentLoaded", wire);
