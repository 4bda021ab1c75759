// Helpers every part of the page uses: elements, the API, drop zones, dialogs, undo, the webcam.
"use strict";

const $ = id => document.getElementById(id);
const bus = new EventTarget();  // "classes" and "models" events: a part changed what others show
const changed = what => bus.dispatchEvent(new Event(what));

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

function send(url, method, body) {
  return api(url, {method, headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
}

const classUrl = name => `/classes/${encodeURIComponent(name)}`;
const photoUrl = photo => `/photos/${encodeURIComponent(photo)}`;

function showError(node, error) {
  node.textContent = error ? String(error.message || error) : "";
  node.hidden = !error;
}

// Make `zone` (a <label> around a visually hidden file input) accept dropped files too.
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

// A modal yes/no question; resolves true for "Delete". Escape or "Keep" says no.
function askConfirm(text) {
  const dialog = $("confirm-dialog");
  $("confirm-text").textContent = text;
  return new Promise(resolve => {
    const done = answer => () => { dialog.close(); resolve(answer); };
    $("confirm-yes").onclick = done(true);
    $("confirm-no").onclick = done(false);
    dialog.oncancel = done(false);
    dialog.showModal();
    $("confirm-no").focus();
  });
}

// After a deletion: "Deleted …  [Undo]" until the next one.
function offerUndo(text, token) {
  $("undo-text").textContent = text;
  $("undo-bar").hidden = false;
  $("undo").onclick = async () => {
    $("undo-bar").hidden = true;
    try {
      await api(`/undo/${token}`, {method: "POST"});
    } catch (e) {
      showError($("class-error"), e);
    }
    changed("classes");
  };
}

// The webcam into a <video>; the stream, or throws with a message a person can act on.
async function startCamera(video) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error("this browser offers no webcam here (it needs localhost or https)");
  }
  try {
    video.srcObject = await navigator.mediaDevices.getUserMedia({video: {width: 640, height: 480}, audio: false});
  } catch (e) {
    throw new Error(`cannot use the webcam: ${e.message || e.name}`);
  }
  await video.play();
  return video.srcObject;
}

function stopCamera(video) {
  if (video.srcObject) video.srcObject.getTracks().forEach(track => track.stop());
  video.srcObject = null;
}

// The video's current frame as a JPEG file.
function grabFrame(video, name) {
  const canvas = el("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  return new Promise(resolve => canvas.toBlob(blob => resolve(new File([blob], name, {type: "image/jpeg"})),
                                              "image/jpeg", 0.9));
}

// Top-k predictions as labelled bars.
function bars(predictions) {
  return predictions.map(({label, score}) => {
    const fill = el("div", {class: "fill"});
    fill.style.width = `${(100 * score).toFixed(1)}%`;
    return el("div", {class: "bar"}, el("span", {class: "label"}, label),
              el("span", {class: "score"}, `${(100 * score).toFixed(1)}%`),
              el("div", {class: "track", role: "presentation"}, fill));
  });
}
