// The dataset page while a build runs: records done / total and the ETA, every second.
"use strict";

function buildText(p) {
  if (!p) { return "starting"; }
  const parts = [p.stage === "scan" ? `checking images ${p.images_checked} / ${p.images_total}`
                                    : `${p.records_done} / ${p.records_total} records`];
  if (p.stage === "mean") { parts.push("computing the mean image"); }
  if (p.stage === "contact_sheet") { parts.push("drawing the sample sheet"); }
  if (p.eta_seconds !== null && p.eta_seconds !== undefined) {
    parts.push(`ETA ${formatSeconds(p.eta_seconds)}`);
  }
  return parts.join(" · ");
}

function buildShare(p) {
  // the bar: images checked and records written, one unit of work each
  if (!p) { return 0; }
  const total = p.images_total + (p.records_total || p.images_total);
  return total ? (p.images_checked + p.records_done) / total : 0;
}

function followBuild(id) {
  const timer = setInterval(async () => {
    let record;
    try { record = await api("GET", `/api/datasets/${id}`); }
    catch (err) { clearInterval(timer); return; }
    if (["ready", "failed"].includes(record.state)) { clearInterval(timer); location.reload(); return; }
    document.getElementById("build-progress").textContent = buildText(record.progress);
    document.getElementById("build-bar").style.width =
      `${(100 * buildShare(record.progress)).toFixed(1)}%`;
  }, 1000);
}
