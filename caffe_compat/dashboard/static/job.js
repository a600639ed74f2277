// The job page: curves pushed by server-sent events, progress and ETA, stop/resume, classify.
"use strict";

const FINAL_STATES = ["done", "failed", "stopped", "interrupted"];

function chartsFor(page) {
  const make = (id, options) => new LineChart(page.querySelector(`#${id}`), options);
  return {loss: make("chart-loss"), accuracy: make("chart-accuracy", {fromZero: true}),
          lr: make("chart-lr", {fromZero: true}),
          aux: make("chart-aux"), smoothed: [], smoothedDiffers: false};
}

function plotPoint(charts, p) {
  // The chart a value goes to follows its name: the main loss, accuracies, the rest
  // (auxiliary outputs such as landmark_loss, whose scale is unrelated to the main loss).
  const outputs = p.outputs || {};
  const main = mainLoss(outputs);
  if (p.kind === "train") {
    // the solver's loss is the weighted sum of every loss: with auxiliary losses the main
    // one is drawn from its own output (and the smoothed total, of another scale, is not)
    const alone = Object.keys(outputs).every(n => n === main || !/loss/i.test(n));
    const loss = trainLoss(p);
    charts.loss.add("train loss", p.iter, loss);
    if (charts.epochMean) { charts.loss.add("train, epoch mean", p.iter, charts.epochMean.push(loss)); }
    // smoothed = loss when the solver's average_loss is 1: drawn only once it differs
    charts.smoothed.push([p.iter, p.smoothed_loss]);
    charts.smoothedDiffers = charts.smoothedDiffers || p.smoothed_loss !== p.loss;
    if (charts.smoothedDiffers && alone) { charts.loss.set("smoothed", charts.smoothed); }
    charts.lr.add("lr", p.iter, p.lr);
    for (const [name, v] of Object.entries(outputs)) {
      if (name !== main) { charts.aux.add(`train ${name}`, p.iter, v); }
    }
  } else if (p.kind === "test") {
    const net = p.net ? `test#${p.net}` : "test";
    for (const [name, v] of Object.entries(outputs)) {
      if (/accuracy/i.test(name)) { charts.accuracy.add(`${net} ${name}`, p.iter, v); }
      else if (name === main) { charts.loss.add(`${net} ${name}`, p.iter, v); }
      else { charts.aux.add(`${net} ${name}`, p.iter, v); }
    }
  }
  charts.aux.container.hidden = charts.aux.series.size === 0;
}

function showState(record) {
  const state = document.getElementById("state");
  state.textContent = record.state;
  state.className = `state ${record.state}`;
  document.getElementById("error").textContent = record.error || "";
  const p = record.progress || {};
  const parts = [];
  if (p.iter !== undefined) { parts.push(`iteration ${p.iter}${p.max_iter ? " / " + p.max_iter : ""}`); }
  if (p.images_per_second) { parts.push(`${p.images_per_second.toFixed(1)} images/s`); }
  if (p.eta_seconds && !FINAL_STATES.includes(record.state)) { parts.push(`ETA ${formatSeconds(p.eta_seconds)}`); }
  const result = record.result || {};
  if (FINAL_STATES.includes(record.state) && result.seconds) { parts.push(`took ${formatSeconds(result.seconds)}`); }
  if (result.val_accuracy !== undefined && result.val_accuracy !== null) {
    parts.push(`validation accuracy ${(100 * result.val_accuracy).toFixed(2)} %`);
  }
  document.getElementById("progress").textContent = parts.join(" · ");
  document.getElementById("stop").disabled = !["queued", "running"].includes(record.state);
  document.getElementById("resume").disabled = !["stopped", "interrupted", "failed"].includes(record.state);
  const link = document.getElementById("bundle-link");
  link.hidden = !record.bundle && record.snapshot === null;
  link.textContent = record.bundle ? "bundle (.zip)"
                                   : `bundle of the iteration ${record.snapshot} snapshot (.zip)`;
}

function renderPredictions(slot, results) {
  slot.replaceChildren();
  for (const r of results) {
    const item = document.createElement("div");
    item.className = "prediction";
    const table = document.createElement("table");
    table.className = "predictions";
    const caption = table.createCaption();
    caption.textContent = r.image;
    for (const t of r.top) {
      const row = table.insertRow();
      row.insertCell().textContent = t.label;
      const bar = row.insertCell();
      bar.innerHTML = `<span class="bar" style="width:${(100 * t.probability).toFixed(1)}%"></span>`;
      row.insertCell().textContent = (100 * t.probability).toFixed(2) + " %";
    }
    if (r.overlay) { item.appendChild(landmarkFigure(r)); }
    item.appendChild(table);
    slot.appendChild(item);
  }
}

function landmarkFigure(r) {
  // A landmark model: its heatmaps over the photo, and where each landmark peaks.
  const figure = document.createElement("figure");
  figure.className = "landmarks";
  const img = document.createElement("img");
  img.src = r.overlay;
  img.alt = `predicted landmark heatmaps over ${r.image}`;
  figure.appendChild(img);
  const caption = document.createElement("figcaption");
  caption.textContent = r.landmarks.filter(p => p.shown)
    .map(p => `${p.index} ${p.name.replace("_", " ")} (${Math.round(p.x)}, ${Math.round(p.y)})`)
    .join(" · ") || "no landmark stands out";
  figure.appendChild(caption);
  return figure;
}

function renderScore(slot, summary) {
  slot.replaceChildren();
  const head = document.createElement("p");
  head.id = "score-accuracy";
  head.textContent = `accuracy ${(100 * summary.accuracy).toFixed(2)} % ` +
                     `(${summary.correct} of ${summary.images} images), ${summary.weights}`;
  slot.appendChild(head);
  const table = document.createElement("table");
  table.insertRow().innerHTML = "<th>class</th><th>precision</th><th>recall</th><th>images</th>";
  for (const [name, row] of Object.entries(summary.per_class)) {
    const cells = table.insertRow();
    for (const v of [name, row.precision, row.recall, row.support]) {
      cells.insertCell().textContent = typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : (v ?? "—");
    }
  }
  slot.appendChild(table);
  for (const url of Object.values(summary.files || {})) {
    const img = document.createElement("img");
    img.src = url;
    img.className = "score-picture";
    slot.appendChild(img);
  }
}

function startJobPage(id, epochs) {
  const charts = chartsFor(document);
  let source = null, perEpoch = 0;
  const listen = () => {
    for (const chart of [charts.loss, charts.accuracy, charts.lr, charts.aux]) {
      chart.series.clear();
      chart.schedule();
    }
    charts.smoothed = [];
    // a noisy per-iteration loss reads better beside its mean over the last epoch
    charts.epochMean = perEpoch > 1 ? new RunningMean(perEpoch) : null;
    charts.aux.container.hidden = true;
    source = new EventSource(`/api/jobs/${id}/stream`);
    source.addEventListener("metric", e => plotPoint(charts, JSON.parse(e.data)));
    source.addEventListener("state", e => {
      const record = JSON.parse(e.data);
      showState(record);
      // the run's length is known once caffe fit has written its solver: replay the stream
      // with the epoch mean from the start
      const known = iterationsPerEpoch({progress: record.progress, options: {epochs}});
      if (known && !perEpoch) { perEpoch = known; source.close(); listen(); }
    });
    source.addEventListener("end", () => source.close());
  };
  listen();
  api("GET", `/api/jobs/${id}`).then(showState).catch(() => {});
  document.getElementById("stop").addEventListener("click", async () => {
    try { await api("POST", `/api/jobs/${id}/stop`); } catch (err) { alert(err.message); }
  });
  document.getElementById("resume").addEventListener("click", async () => {
    try {
      await api("POST", `/api/jobs/${id}/resume`);
      source.close();
      listen();
    } catch (err) { alert(err.message); }
  });
  document.getElementById("score").addEventListener("submit", async event => {
    event.preventDefault();
    const f = event.target;
    showError(f, null);
    try {
      renderScore(document.getElementById("score-result"),
                  await api("POST", `/api/jobs/${id}/score`, {folder: f.folder.value}));
    } catch (err) { showError(f, err); }
  });
  document.getElementById("classify").addEventListener("submit", async event => {
    event.preventDefault();
    const f = event.target;
    showError(f, null);
    const data = new FormData();
    for (const file of f.image.files) { data.append("image", file); }
    try {
      const answer = await api("POST", `/api/jobs/${id}/classify?top_k=${f.top_k.value}`, data);
      renderPredictions(document.getElementById("predictions"), answer.results);
      document.getElementById("classified-with").textContent = `with the ${answer.weights}`;
    } catch (err) { showError(f, err); }
  });
}
