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
