// Step 4: what the model learned and where the data needs fixing: verdict, per-class table, mistakes,
// doctor's findings, the report. Photos open in the same dialog as in step 1, to move or delete them.
"use strict";

let shownModel = null;

function showUnderstanding(model) {
  $("understand-step").hidden = !model;
  if (!model) return;
  const fresh = !shownModel || shownModel.id !== model.id;
  shownModel = model;
  $("understand-title").textContent = `4. Understand and fix: the model trained ${model.created ? new Date(model.created).toLocaleString() : ""}`;
  $("verdict").textContent = (model.verdict || []).join(" ");
  $("download").href = model.download;
  $("report-link").href = model.report;
  if (fresh) $("report").src = model.report;
  $("per-class").replaceChildren(perClassTable(model.per_class || {}));
  showFixes();
}

function perClassTable(perClass) {
  const head = el("tr", {}, ...["class", "precision", "recall", "F1", "test photos"].map(h => el("th", {scope: "col"}, h)));
  const rows = Object.entries(perClass).map(([name, m]) => el("tr", {},
    el("th", {scope: "row"}, name),
    ...(m.support ? [m.precision, m.recall, m.f1].map(v => v === null
      ? el("td", {title: "never predicted: precision undefined"}, "-") : el("td", {}, v.toFixed(2)))
      : [el("td", {colspan: "3"}, "no test photos")]),
    el("td", {}, String(m.support))));
  if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: "5"}, "no test photos")));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows));
}

async function showFixes() {
  if (!shownModel) return;
  const model = shownModel, id = model.id;  // the model asked about, even if another is shown meanwhile
  try {
    const [{mistakes}, {items, notes}] = await Promise.all([api(`/models/${id}/mistakes`), api(`/models/${id}/findings`)]);
    $("mistakes").replaceChildren(...(mistakes.length ? mistakes.map(m => m.class
      ? thumb(m.photo, m.class, `${m.label} → ${m.predicted} (${(100 * m.confidence).toFixed(0)}%)${m.class !== m.label ? ", now in " + m.class : ""}`)
      : el("span", {class: "muted"}, `${m.label} → ${m.predicted}: photo deleted`))
      : [el("p", {class: "muted"}, noMistakes(model))]));
    $("findings").replaceChildren(...items.map(finding), ...notes.map(n => el("li", {class: "muted"}, n)));
    if (!items.length && !notes.length) $("findings").append(el("li", {class: "muted"}, "Nothing found."));
  } catch (e) {
    $("findings").replaceChildren(el("li", {class: "error"}, e.message));
  }
}

// Why the list of mistakes is empty: none made, or nothing tested (no test photos: not a clean record).
function noMistakes(model) {
  if (!model.test_evidence) return `Its test results are unknown: ${model.note || "it records none"}.`;
  const n = model.test_evidence.n;
  if (!n) return "No test photos: none were held out to test the model on, so its mistakes are not known. " +
                 "Add photos to every class.";
  return `No mistakes on the ${n} test photo${n === 1 ? "" : "s"}.`;
}

function finding(item) {
  const photos = item.photos.map(p => p.class ? thumb(p.photo, p.class, p.class) : el("span", {class: "muted"}, "(gone)"));
  return el("li", {}, el("strong", {}, item.kind), ` ${item.detail} `, el("span", {class: "thumbs"}, ...photos));
}

bus.addEventListener("classes", showFixes);
