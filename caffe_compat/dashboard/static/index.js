// The start page's two forms: build a dataset, start a training job.
"use strict";

document.getElementById("new-dataset").addEventListener("submit", async event => {
  event.preventDefault();
  const f = event.target;
  showError(f, null);
  try {
    const body = {folder: f.folder.value, resize: [Number(f.height.value), Number(f.width.value)],
                  val_percent: Number(f.val_percent.value), seed: Number(f.seed.value)};
    if (f.elements["name"].value) { body.name = f.elements["name"].value; }
    if (f.landmarks.value) { body.landmarks = f.landmarks.value; }
    const created = await api("POST", "/api/datasets", body);
    location.href = `/datasets/${created.id}`;
  } catch (err) { showError(f, err); }
});

document.getElementById("new-job").addEventListener("submit", async event => {
  event.preventDefault();
  const f = event.target;
  showError(f, null);
  try {
    const body = {dataset: Number(f.dataset.value), model: f.model.value,
                  epochs: Number(f.epochs.value), precision: f.precision.value};
    if (f.weights.value) { body.weights = f.weights.value; }
    if (f.weights_file.files.length) {          // upload it first; the job names its id
      const data = new FormData();
      data.append("file", f.weights_file.files[0]);
      body.weights = (await api("POST", "/api/uploads", data)).id;
    }
    const solver = {};
    for (const name of ["type", "base_lr", "momentum", "momentum2", "weight_decay",
                        "clip_gradients", "delta", "rms_decay", "regularization_type"]) {
      if (f.elements[name].value !== "") { solver[name] = f.elements[name].value; }
    }
    if (Object.keys(solver).length) { body.solver = solver; }
    if (f.batch_size.value) { body.batch_size = Number(f.batch_size.value); }
    const created = await api("POST", "/api/jobs", body);
    location.href = `/jobs/${created.id}`;
  } catch (err) { showError(f, err); }
});

document.getElementById("import-dataset").addEventListener("submit", async event => {
  event.preventDefault();
  const f = event.target;
  showError(f, null);
  const body = {};
  for (const name of ["train_db", "val_db", "mean", "labels", "name"]) {
    if (f.elements[name].value) { body[name] = f.elements[name].value; }
  }
  try {
    const created = await api("POST", "/api/datasets/import", body);
    location.href = `/datasets/${created.id}`;
  } catch (err) { showError(f, err); }
});

document.getElementById("new-protocol").addEventListener("submit", async event => {
  event.preventDefault();
  const f = event.target;
  showError(f, null);
  const body = {folder: f.folder.value, model: f.model.value, runs: Number(f.runs.value),
                epochs: Number(f.epochs.value)};
  if (f.per_class.value) { body.per_class = f.per_class.value; }
  try {
    const created = await api("POST", "/api/protocols", body);
    location.href = `/protocols/${created.id}`;
  } catch (err) { showError(f, err); }
});

// The lists follow the work: states, build and training progress, accuracies, every 2 s
// while anything is queued or running (the forms above are left alone).
function rowOf(table, id) { return document.querySelector(`#${table} tr[data-id="${id}"]`); }

function setState(row, state) {
  const cell = row.querySelector(".state");
  cell.textContent = state;
  cell.className = `state ${state}`;
}

function datasetRow(d) {
  const row = rowOf("datasets", d.id);
  if (!row) { return; }
  const p = d.progress;
  setState(row, d.state);
  if (p && ["queued", "running"].includes(d.state)) {
    row.querySelector("[data-role=images]").textContent = p.records_total
      ? `${p.records_done} / ${p.records_total} records` : `checking ${p.images_checked} / ${p.images_total}`;
  } else if (d.result && d.result.train_count !== undefined) {
    row.querySelector("[data-role=classes]").textContent = (d.result.classes || []).length;
    row.querySelector("[data-role=images]").textContent = `${d.result.train_count} / ${d.result.val_count}`;
    const select = document.querySelector("#new-job select[name=dataset]");
    if (d.state === "ready" && !select.querySelector(`option[value="${d.id}"]`)) {
      select.add(new Option(`${d.id}: ${d.name}`, d.id), 0);
    }
  }
}

function jobRow(j) {
  const row = rowOf("jobs", j.id);
  if (!row) { return; }
  setState(row, j.state);
  const p = j.progress || {};
  const parts = [];
  if (j.state === "running" && p.max_iter) {
    parts.push(`${Math.round(100 * p.iter / p.max_iter)} %`);
    if (p.eta_seconds) { parts.push(`ETA ${formatSeconds(p.eta_seconds)}`); }
  }
  row.querySelector("[data-role=progress]").textContent = parts.join(" · ");
  const acc = (j.result || {}).val_accuracy;
  if (acc !== undefined && acc !== null) {
    row.querySelector("[data-role=accuracy]").textContent = acc.toFixed(4);
  }
}

async function followLists() {
  const busy = () => [...document.querySelectorAll("#datasets .state, #jobs .state")]
    .some(cell => ["queued", "running"].includes(cell.textContent));
  while (busy()) {
    try {
      (await api("GET", "/api/datasets")).forEach(datasetRow);
      (await api("GET", "/api/jobs")).forEach(jobRow);
    } catch (err) { return; }
    await new Promise(resolve => setTimeout(resolve, 2000));
  }
}

followLists();
