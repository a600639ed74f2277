// Helpers every page uses: JSON calls to the API with its one-line errors, form values.
"use strict";

async function api(method, url, body) {
  const init = {method, headers: {}};
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (err) { data = {error: text}; }
  if (!response.ok) {
    let message = data && data.error;
    if (!message && data && data.detail) {      // the framework's request validation
      message = Array.isArray(data.detail)
        ? data.detail.map(d => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ")
        : String(data.detail);
    }
    throw new Error(message || `HTTP ${response.status}`);
  }
  return data;
}

function showError(form, err) {
  const slot = form.querySelector("[data-role=error]");
  if (slot) { slot.textContent = err ? err.message : ""; }
}

function mainLoss(outputs) {
  // The net's main loss, as the PNG plot picks it: the output named "loss", else the first
  // loss-like name; other losses (e.g. landmark_loss) are auxiliary, on their own scale.
  const names = Object.keys(outputs || {});
  return names.includes("loss") ? "loss" : names.find(n => /loss/i.test(n)) || null;
}

function trainLoss(p) {
  // A train point's main loss: the solver's (weighted) total when it is the only loss,
  // else the main loss output itself (the total mixes in auxiliary losses' scales).
  const outputs = p.outputs || {};
  const main = mainLoss(outputs);
  const alone = Object.keys(outputs).every(n => n === main || !/loss/i.test(n));
  return alone || !main ? p.loss : outputs[main];
}

class RunningMean {
  // The mean of the last `span` values (an epoch of train losses: a curve that reads).
  constructor(span) { this.span = Math.max(1, Math.round(span)); this.values = []; this.sum = 0; }
  push(v) {
    this.values.push(v);
    this.sum += v;
    if (this.values.length > this.span) { this.sum -= this.values.shift(); }
    return this.sum / this.values.length;
  }
}

function iterationsPerEpoch(record) {
  const p = record.progress || {}, epochs = (record.options || {}).epochs;
  return p.max_iter && epochs ? p.max_iter / epochs : null;
}

function formatSeconds(s) {
  if (!Number.isFinite(s)) { return "?"; }
  if (s < 1) { return "under 1 s"; }
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), r = s % 60;
  return h ? `${h} h ${m} min` : m ? `${m} min ${r} s` : `${r} s`;
}
