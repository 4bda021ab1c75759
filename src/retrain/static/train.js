// The training page: classes, photo uploads, a background training run, the model download.
"use strict";

const $ = id => document.getElementById(id);
const UPLOAD_CHUNK = 8;  // photos per request: well under the server's per-request limits
let polling = null;

async function refreshClasses() {
  const {classes} = await api("/classes");
  const known = new Set(classes.map(c => c.name));
  for (const card of [...$("classes").children]) {
    if (!known.has(card.dataset.class)) card.remove();
  }
  for (const {name, images} of classes) {
    const card = classCard(name);
    card.querySelector(".count").textContent = `${images} photo${images === 1 ? "" : "s"}`;
  }
}

function classCard(name) {
  const existing = [...$("classes").children].find(c => c.dataset.class === name);
  if (existing) return existing;
  const input = el("input", {type: "file", accept: "image/*", multiple: ""});
  const zone = el("label", {class: "drop"}, "Drop photos or click to add", input);
  const remove = el("button", {type: "button", class: "secondary", title: "delete this class"}, "✕");
  const card = el("div", {class: "class-card"},
                  el("h3", {}, el("span", {class: "name"}, name), remove),
                  el("p", {class: "count muted"}, "0 photos"), zone,
                  el("p", {class: "error", hidden: ""}), el("div", {class: "thumbs"}));
  card.dataset.class = name;
  dropZone(zone, input, files => upload(card, files));
  remove.addEventListener("click", () => deleteClass(name));
  $("classes").append(card);
  return card;
}

async function upload(card, files) {
  const errorNode = card.querySelector(".error");
  const problems = [];
  for (let i = 0; i < files.length; i += UPLOAD_CHUNK) {
    const chunk = files.slice(i, i + UPLOAD_CHUNK);
    const form = new FormData();
    for (const file of chunk) form.append("files", file, file.name);
    try {
      const reply = await api(`/classes/${encodeURIComponent(card.dataset.class)}/images`,
                              {method: "POST", body: form});
      card.querySelector(".count").textContent = `${reply.images} photos`;
      problems.push(...reply.rejected.map(r => r.error));
      const bad = new Set(reply.rejected.map(r => r.file));
      for (const file of chunk.filter(f => !bad.has(f.name)).slice(0, 4)) {
        card.querySelector(".thumbs").append(el("img", {src: URL.createObjectURL(file), alt: ""}));
      }
    } catch (e) {
      problems.push(e.message);
    }
  }
  showError(errorNode, problems.length ? problems.join("; ") : null);
}

async function deleteClass(name) {
  try {
    await api(`/classes/${encodeURIComponent(name)}`, {method: "DELETE"});
  } catch (e) {
    showError($("class-error"), e);
  }
  await refreshClasses();
}

$("add-class").addEventListener("submit", async e => {
  e.preventDefault();
  try {
    const {name} = await api("/classes", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify({name: $("class-name").value})});
    classCard(name);
    $("class-name").value = "";
    showError($("class-error"), null);
  } catch (err) {
    showError($("class-error"), err);
  }
});

$("train-form").addEventListener("submit", async e => {
  e.preventDefault();
  showError($("job-error"), null);
  $("result").hidden = true;
  try {
    const job = await api("/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                                    body: JSON.stringify({steps: Number($("steps").value)})});
    follow(job);
  } catch (err) {
    showError($("job-error"), err);
  }
});

function follow(job) {
  clearInterval(polling);
  render(job);
  $("cancel").onclick = () => api(`/jobs/${job.id}`, {method: "DELETE"}).then(render).catch(() => {});
  polling = setInterval(async () => {
    try {
      render(await api(`/jobs/${job.id}`));
    } catch (err) {
      clearInterval(polling);
      showError($("job-error"), err);
    }
  }, 500);
}

function render(job) {
  const running = job.status === "running";
  $("job").hidden = false;
  $("train").disabled = running;
  $("cancel").hidden = !running;
  $("stage").textContent = running ? job.stage : job.status;
  $("elapsed").textContent = `${job.elapsed_s.toFixed(0)} s`;
  if (!running) $("progress").value = 1;
  else if (job.progress === null) $("progress").removeAttribute("value");  // indeterminate
  else $("progress").value = job.progress;
  $("log").textContent = job.log.join("\n");
  if (running) return;
  clearInterval(polling);
  if (job.status === "failed") showError($("job-error"), job.error || "training failed");
  if (job.status === "done") showResult(job);
}

function showResult(job) {
  const {verdict, classes} = job.result;
  // The verdict carries the evidence (N, the 95% interval, or why no figure can be given).
  $("accuracy").textContent = verdict && verdict.length
    ? `Trained on ${classes.join(", ")}. ${verdict.join(" ")}`
    : `Trained on ${classes.join(", ")}.`;
  $("download").href = job.download;
  $("result").hidden = false;
}

refreshClasses().catch(err => showError($("class-error"), err));
api("/jobs").then(({jobs}) => { if (jobs.length) follow(jobs[jobs.length - 1]); }).catch(() => {});
