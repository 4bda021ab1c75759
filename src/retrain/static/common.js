// Helpers shared by both pages: building elements, calling the API, drop zones.
"use strict";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  // Text is always added as text nodes: labels and file names never become HTML.
  for (const child of children) node.append(child);
  return node;
}

function sleep(ms) { return new Promise(resolve => setTimeout(resolve, ms)); }

// fetch + JSON; throws Error(message from the server's {"error": ...}); waits and retries on 503.
async function api(url, options = {}, retries = 5) {
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(url, options);
    if (response.status === 503 && attempt < retries) {
      const wait = Number(response.headers.get("Retry-After")) || 1;
      await sleep(wait * 1000 * (1 + Math.random()));  // jitter: retries don't arrive in lockstep
      continue;
    }
    let body = null;
    try { body = await response.json(); } catch (e) { /* not JSON */ }
    if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
    return body;
  }
}

function showError(node, error) {
  node.textContent = error ? String(error.message || error) : "";
  node.hidden = !error;
}

// Make `zone` (a <label> around a hidden file input) accept dropped files too.
function dropZone(zone, input, onFiles) {
  input.addEventListener("change", () => { onFiles([...input.files]); input.value = ""; });
  zone.addEventListener("dragover", e => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", e => {
    e.preventDefault();
    zone.classList.remove("over");
    onFiles([...e.dataTransfer.files]);
  });
}

// Run `task` over `items`, at most `limit` at a time.
async function eachLimited(items, limit, task) {
  const queue = [...items];
  const workers = Array.from({length: Math.min(limit, queue.length)}, async () => {
    while (queue.length) await task(queue.shift());
  });
  await Promise.all(workers);
}
