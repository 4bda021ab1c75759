// Step 1: classes and their photos. Everything shown comes from the server, so a reload shows it all again.
"use strict";

const UPLOAD_CHUNK = 8;  // photos per request at most
let classNames = [], uploadLimits;  // the server's, read with /classes before any card can upload

function seconds(s) { return s < 90 ? `~${s} s` : `~${Math.round(s / 60)} min`; }

async function refreshClasses() {
  const {classes, estimates, upload_limits} = await api("/classes");
  classNames = classes.map(c => c.name);
  uploadLimits = upload_limits;
  $("estimate-fast").textContent = `(${seconds(estimates.fast.seconds)} for ${photoCount(classes)})`;
  $("estimate-accurate").textContent = `(up to ${seconds(estimates.accurate.seconds)})`;
  $("plan-accurate").textContent = classes.length ? `More accurate, on these photos: ${estimates.accurate.plan}.` : "";
  const known = new Set(classNames);
  for (const card of [...$("classes").children]) {
    if (!known.has(card.dataset.class)) card.remove();
  }
  await Promise.all(classes.map(async ({name, images}) => {
    const card = classCard(name);
    card.querySelector(".count").textContent = `${images} photo${images === 1 ? "" : "s"}`;
    const {photos} = await api(`${classUrl(name)}/photos`);
    card.querySelector(".thumbs").replaceChildren(...photos.map(photo => thumb(photo, name)));
  }));
}

function photoCount(classes) {
  const n = classes.reduce((sum, c) => sum + c.images, 0);
  return `${n} photo${n === 1 ? "" : "s"}`;
}

// A photo as a button: click or Enter opens it to view, move or delete.
function thumb(photo, className, caption) {
  const button = el("button", {type: "button", class: "thumb", "data-photo": photo,
                               "aria-label": `photo in ${className}${caption ? ", " + caption : ""}`},
                    el("img", {src: photoUrl(photo), alt: "", loading: "lazy"}));
  if (caption) button.append(el("span", {class: "caption"}, caption));
  button.addEventListener("click", () => openPhoto(photo, className));
  return button;
}

function classCard(name) {
  const existing = [...$("classes").children].find(c => c.dataset.class === name);
  if (existing) return existing;
  const id = `files-${classNames.indexOf(name)}-${Math.random().toString(36).slice(2, 8)}`;
  const input = el("input", {type: "file", accept: "image/*", multiple: "", id, class: "visually-hidden"});
  const zone = el("label", {class: "drop", for: id}, "Drop photos or click to add", input);
  const camera = el("button", {type: "button", class: "secondary camera"}, "Webcam");
  const remove = el("button", {type: "button", class: "secondary delete-class", "aria-label": `delete class ${name}`}, "Delete");
  const card = el("article", {class: "class-card"},
                  el("h3", {class: "name"}, name),
                  el("p", {class: "row"}, el("span", {class: "count muted"}, "0 photos"), camera, remove), zone,
                  el("p", {class: "note muted", "aria-live": "polite"}), el("p", {class: "error", role: "alert", hidden: ""}),
                  el("div", {class: "thumbs"}));
  card.dataset.class = name;
  dropZone(zone, input, files => upload(card, files));
  camera.addEventListener("click", () => openCamera(card));
  remove.addEventListener("click", () => deleteClass(card));
  $("classes").append(card);
  return card;
}

async function upload(card, files) {
  const problems = [], duplicates = [], doubts = [];
  let added = 0;
  for (const chunk of uploadChunks(files)) {
    const form = new FormData();
    for (const file of chunk) form.append("files", file, file.name);
    try {
      const reply = await api(`${classUrl(card.dataset.class)}/images`, {method: "POST", body: form});
      added += reply.added.length;
      duplicates.push(...reply.duplicates);
      doubts.push(...reply.doubts);
      problems.push(...reply.rejected.map(r => r.error));
    } catch (e) {  // the whole request was refused: say which photos it held
      problems.push(`${chunk.map(f => f.name).join(", ")}: ${e.message}`);
    }
  }
  const note = [`${added} photo${added === 1 ? "" : "s"} added`];
  if (duplicates.length) note.push(`${duplicates.length} already in this class: ${duplicates.join(", ")}`);
  if (doubts.length) note.push(`check: ${doubts.join(", ")}`);
  card.querySelector(".note").textContent = note.join("; ");
  showError(card.querySelector(".error"), problems.length ? problems.join("; ") : null);
  changed("classes");
}

// Requests of at most UPLOAD_CHUNK photos that stay under the server's body limit (a little is kept for
// the form's own bytes); a photo over the limit on its own goes alone, and the server names the limit.
function uploadChunks(files) {
  const room = uploadLimits.bytes - (64 << 10), most = Math.min(UPLOAD_CHUNK, uploadLimits.files);
  const chunks = [];
  let chunk = [], size = 0;
  for (const file of files) {
    if (chunk.length && (chunk.length === most || size + file.size > room)) {
      chunks.push(chunk);
      chunk = [], size = 0;
    }
    chunk.push(file);
    size += file.size;
  }
  if (chunk.length) chunks.push(chunk);
  return chunks;
}

async function deleteClass(card) {
  const name = card.dataset.class;
  const count = card.querySelector(".count").textContent;
  if (!await askConfirm(`Delete the class "${name}" and its ${count}? You can undo this.`)) return;
  try {
    const {undo} = await api(classUrl(name), {method: "DELETE"});
    offerUndo(`Deleted the class "${name}".`, undo);
  } catch (e) {
    showError($("class-error"), e);
  }
  changed("classes");
}

// The photo dialog: the photo large, a class to move it to, delete.
function openPhoto(photo, className) {
  const dialog = $("photo-dialog");
  $("photo-title").textContent = `Photo in "${className}"`;
  $("photo-big").src = photoUrl(photo);
  $("move-to").replaceChildren(...classNames.map(n => el("option", n === className ? {selected: ""} : {}, n)));
  showError($("photo-error"), null);
  const act = work => async () => {
    try {
      await work();
      dialog.close();
    } catch (e) {
      showError($("photo-error"), e);
    }
    changed("classes");
  };
  $("move").onclick = act(() => send(`${classUrl(className)}/photos/${photo}/move`, "POST", {to: $("move-to").value}));
  $("delete-photo").onclick = act(async () => {
    const {undo} = await api(`${classUrl(className)}/photos/${photo}`, {method: "DELETE"});
    offerUndo(`Deleted a photo from "${className}".`, undo);
  });
  $("close-photo").onclick = () => dialog.close();
  dialog.showModal();
}

// The webcam dialog: each "Take a photo" adds the current frame to the card's class.
async function openCamera(card) {
  const dialog = $("camera-dialog"), video = $("camera-video");
  $("camera-title").textContent = `Webcam photos for "${card.dataset.class}"`;
  $("camera-count").textContent = "";
  showError($("camera-error"), null);
  let taken = 0;
  $("capture").onclick = async () => {
    const frame = await grabFrame(video, `webcam-${Date.now()}.jpg`);
    await upload(card, [frame]);
    $("camera-count").textContent = `${++taken} taken`;
  };
  const close = () => { stopCamera(video); dialog.close(); };
  $("camera-done").onclick = close;
  dialog.oncancel = () => stopCamera(video);
  dialog.showModal();
  try {
    await startCamera(video);
  } catch (e) {
    showError($("camera-error"), e);
  }
}

$("add-class").addEventListener("submit", async e => {
  e.preventDefault();
  try {
    await send("/classes", "POST", {name: $("class-name").value});
    $("class-name").value = "";
    showError($("class-error"), null);
  } catch (err) {
    showError($("class-error"), err);
  }
  changed("classes");
});

bus.addEventListener("classes", () => refreshClasses().catch(err => showError($("class-error"), err)));
changed("classes");
