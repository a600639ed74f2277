// Overlay the curves of chosen jobs, with each one's final test results.
"use strict";

async function startCompare(ids) {
  document.getElementById("choose").addEventListener("submit", event => {
    event.preventDefault();
    const chosen = [...event.target.querySelectorAll("input[name=job]:checked")].map(i => i.value);
    location.href = `/compare?jobs=${chosen.join(",")}`;
  });
  // Runs of different batch sizes and data sets line up by epoch (iterations when a job's
  // length is unknown); the train loss is the main loss's mean over the last epoch.
  const byEpoch = [];
  const records = [];
  for (const id of ids) {
    const record = await api("GET", `/api/jobs/${id}`);
    records.push(record);
    byEpoch.push(iterationsPerEpoch(record));
  }
  const unit = byEpoch.every(Boolean) ? "epoch" : "iteration";
  const loss = new LineChart(document.getElementById("chart-loss"), {xLabel: unit});
  const accuracy = new LineChart(document.getElementById("chart-accuracy"),
                                 {fromZero: true, xLabel: unit});
  const table = document.getElementById("summary");
  for (const [i, record] of records.entries()) {
    const id = record.id, perEpoch = byEpoch[i];
    const x = iter => unit === "epoch" ? iter / perEpoch : iter;
    const mean = new RunningMean(perEpoch || 20);
    const points = await api("GET", `/api/jobs/${id}/metrics`);
    let last = {}, lastIter = 0;
    for (const p of points) {
      if (p.kind === "train") { loss.add(`job ${id}`, x(p.iter), mean.push(trainLoss(p))); lastIter = p.iter; }
      if (p.kind === "test" && !p.net) {
        last = p.outputs || {};
        for (const [name, v] of Object.entries(last)) {
          if (/accuracy/i.test(name)) { accuracy.add(`job ${id}`, x(p.iter), v); }
        }
      }
    }
    const row = table.insertRow();
    const acc = Object.entries(last).find(([n]) => /accuracy/i.test(n));
    const main = mainLoss(last);
    for (const v of [`job ${id}: ${record.name}`, lastIter,
                     perEpoch ? (lastIter / perEpoch).toFixed(1) : "—",
                     acc ? acc[1].toFixed(4) : "—",
                     main ? last[main].toFixed(4) : "—"]) { row.insertCell().textContent = v; }
  }
}
