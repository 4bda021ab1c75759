// Step 2: one training run at a time. Every tab polls the newest run, so any tab can follow or cancel it.
"use strict";

let followed = null;   // the id of the run this tab shows
let lastStatus = null;  // its status when last seen, to notice the moment it ends

$("train-form").addEventListener("submit", async e => {
  e.preventDefault();
  showError($("job-error"), null);
  const quality = new FormData($("train-form")).get("quality");
  try {
    render(await send("/jobs", "POST", {quality}));
  } catch (err) {
    showError($("job-error"), err);
  }
});

$("cancel").addEventListener("click", async () => {
  try {
    render(await api(`/jobs/${followed}`, {method: "DELETE"}));
  } catch (err) {
    showError($("job-error"), err);
  }
});

function render(job) {
  const running = job.status === "running";
  const fresh = job.id !== followed;
  followed = job.id;
  $("job").hidden = false;
  $("train").disabled = running;
  $("cancel").hidden = !running;
  $("job-status").textContent = {running: "Training:", done: "Done.", failed: "Failed.", cancelled: "Cancelled."}[job.status];
  $("stage").textContent = running ? job.stage : "";
  $("elapsed").textContent = `${job.elapsed_s.toFixed(0)} s`;
  // A bar is full only for a finished model; a cancelled or failed run shows where it stopped, or nothing.
  if (job.status === "done") $("progress").value = 1;
  else if (job.progress === null) running ? $("progress").removeAttribute("value") : ($("progress").value = 0);
  else $("progress").value = job.progress;
  $("progress").hidden = job.status === "cancelled" || job.status === "failed";
  const log = $("log"), atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = job.log.join("\n");
  if (atEnd) log.scrollTop = log.scrollHeight;  // follow the log unless the reader scrolled up
  // The error belongs to this run only: cleared while it runs, shown when it failed.
  showError($("job-error"), job.status === "failed" ? job.error || "training failed" : null);
  if (!fresh && lastStatus === "running" && job.status === "done") changed("models");
  lastStatus = job.status;
}

async function poll() {
  for (;;) {
    try {
      const {jobs} = await api("/jobs");
      if (jobs.length) render(jobs[jobs.length - 1]);
    } catch (e) { /* the server restarting: try again */ }
    await sleep(lastStatus === "running" ? 500 : 2000);
  }
}

poll();
