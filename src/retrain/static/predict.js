// The prediction page: each photo is sent on its own, its card shows the top 5 as bars.
"use strict";

const results = document.getElementById("results");

async function showModel() {
  const info = document.getElementById("model-info");
  try {
    const {labels} = await api("/labels");
    const shown = labels.slice(0, 12).join(", ") + (labels.length > 12 ? ", …" : "");
    info.textContent = `The model knows ${labels.length} classes: ${shown}`;
  } catch (e) {
    info.textContent = `Cannot reach the server: ${e.message}`;
  }
}

function bars(predictions) {
  return predictions.map(({label, score}) => {
    const fill = el("div", {class: "fill"});
    fill.style.width = `${(100 * score).toFixed(1)}%`;
    return el("div", {class: "bar"}, el("span", {class: "label"}, label),
              el("span", {class: "score"}, `${(100 * score).toFixed(1)}%`),
              el("div", {class: "track"}, fill));
  });
}

async function classify(file) {
  const status = el("p", {class: "muted status"}, "classifying…");
  const card = el("article", {class: "card"}, el("img", {src: URL.createObjectURL(file), alt: file.name}),
                  el("div", {class: "name", title: file.name}, file.name), status);
  results.prepend(card);
  const form = new FormData();
  form.append("files", file, file.name);
  try {
    const {results: [result]} = await api("/predict?top_k=5", {method: "POST", body: form});
    const rows = bars(result.predictions);
    status.replaceWith(el("div", {class: "predictions"}, ...rows));
    if (result.unknown) card.append(el("span", {class: "badge"}, "unknown: below the confidence threshold"));
    card.dataset.top = result.predictions[0].label;
  } catch (e) {
    status.className = "error status";
    status.textContent = e.message;
  }
}

dropZone(document.getElementById("drop"), document.getElementById("files"),
         files => eachLimited(files, 4, classify));
showModel();
