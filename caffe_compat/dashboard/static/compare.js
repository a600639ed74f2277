// Overlay the curves of chosen jobs, with each one's final test results.
"use strict";

async function startCompare(ids) {
  document.getElementById("choose").addEventListener("submit", event => {
    event.preventDefault();
    const chosen = [...event.target.querySelectorAll("input[name=job]:checked")].map(i => i.value);
    location.href = `/compare?jobs=${chosen.join(",")}`;
  });
  const loss = new LineChart(document.getElementById("chart-loss"));
  const accuracy = new LineChart(document.getElementById("chart-accuracy"), {fromZero: true});
  const table = document.getElementById("summary");
  for (const id of ids) {
    const points = await api("GET", `/api/jobs/${id}/metrics`);
    let last = {}, lastIter = 0;
    for (const p of points) {
      if (p.kind === "train") { loss.add(`job ${id}`, p.iter, p.smoothed_loss); lastIter = p.iter; }
      if (p.kind === "test" && !p.net) {
        last = p.outputs || {};
        for (const [name, v] of Object.entries(last)) {
          if (/accuracy/i.test(name)) { accuracy.add(`job ${id}`, p.iter, v); }
        }
      }
    }
    const row = table.insertRow();
    const acc = Object.entries(last).find(([n]) => /accuracy/i.test(n));
    const main = mainLoss(last);
    for (const v of [`job ${id}`, lastIter, acc ? acc[1].toFixed(4) : "—",
                     main ? last[main].toFixed(4) : "—"]) { row.insertCell().textContent = v; }
  }
}
