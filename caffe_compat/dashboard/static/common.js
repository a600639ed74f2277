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

function formatSeconds(s) {
  if (!Number.isFinite(s)) { return "?"; }
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), r = s % 60;
  return h ? `${h} h ${m} min` : m ? `${m} min ${r} s` : `${r} s`;
}
