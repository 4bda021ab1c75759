// Step 3: try the served model on photos (picked, dropped, pasted) or live on the webcam; switch models.
"use strict";

let liveOn = false;

async function showModels() {
  try {
    const {active, models} = await api("/models");
    $("model-select").replaceChildren(...models.map(m => el("option", {value: m.id, ...(m.active ? {selected: ""} : {})},
                                                           modelName(m))));
    const current = models.find(m => m.active);
    $("serving").textContent = current ? `Serving: ${modelName(current)}` : "";
    const labels = current.classes || [];
    $("model-info").textContent = `${current.num_classes || labels.length} classes: ${labels.join(", ")}` +
                                  ((current.num_classes || 0) > labels.length ? ", …" : "");
    showUnderstanding(models.find(m => m.id === active && m.id !== "startup") || models.find(m => m.id !== "startup"));
  } catch (e) {
    showError($("model-error"), e);
  }
}

function modelName(m) {
  if (m.id === "startup") return `${m.name} (started with)`;
  const when = m.created ? new Date(m.created).toLocaleString() : m.id;
  // The server's words for the test accuracy carry its N and interval, or say why there is no figure.
  const acc = m.test_accuracy_text ? `; test accuracy ${m.test_accuracy_text}` : "";
  return `trained ${when} (${m.classes.join(", ")}${acc})`;
}

$("model-select").addEventListener("change", async () => {
  showError($("model-error"), null);
  try {
    await send("/model", "PUT", {model: $("model-select").value});
  } catch (e) {
    showError($("model-error"), e);
  }
  changed("models");
});

async function classify(file) {
  const status = el("p", {class: "muted status"}, "classifying…");
  const card = el("article", {class: "card"}, el("div", {class: "name", title: file.name}, file.name), status);
  $("results").append(card);  // in the order the photos were given
  const form = new FormData();
  form.append("files", file, file.name);
  try {
    const {results: [result]} = await api("/predict?top_k=5", {method: "POST", body: form});
    card.prepend(el("img", {src: URL.createObjectURL(file), alt: file.name}));  // only a photo the server could read
    status.replaceWith(el("div", {class: "predictions"}, ...bars(result.predictions)));
    if (result.unknown) card.append(el("span", {class: "badge"}, "unknown: below the confidence threshold"));
    card.dataset.top = result.predictions[0].label;
  } catch (e) {
    status.className = "error status";
    status.textContent = e.message;
  }
}

// Live: a frame every ~second, its top 5 replacing the last.
async function live() {
  const video = $("live-video");
  try {
    await startCamera(video);
  } catch (e) {
    showError($("try-error"), e);
    return toggleLive(false);
  }
  while (liveOn) {
    const form = new FormData();
    form.append("files", await grabFrame(video, "webcam.jpg"), "webcam.jpg");
    try {
      const {results: [result]} = await api("/predict?top_k=5", {method: "POST", body: form});
      $("live-result").replaceChildren(...bars(result.predictions));
      $("live-result").dataset.top = result.predictions[0].label;
    } catch (e) {
      showError($("try-error"), e);
    }
    await sleep(800);
  }
  stopCamera(video);
}

function toggleLive(on) {
  liveOn = on;
  $("live").setAttribute("aria-pressed", String(on));
  $("live").textContent = on ? "Stop the webcam" : "Live webcam";
  $("live-panel").hidden = !on;
  if (on) live();
}

$("live").addEventListener("click", () => toggleLive(!liveOn));
dropZone($("drop"), $("files"), files => eachLimited(files, 4, classify));
document.addEventListener("paste", e => {
  const files = [...e.clipboardData.files].filter(f => f.type.startsWith("image/"));
  if (files.length) eachLimited(files, 4, classify);
});
bus.addEventListener("models", showModels);
showModels();
