// The model editor: validated as you type (the CLI's messages, line numbers), drawn by
// Graphviz on the server, and its layers' parameters and FLOPs tabulated.
"use strict";

(function () {
  const text = document.getElementById("prototxt");
  const gutter = document.getElementById("gutter");
  const problems = document.getElementById("problems");
  const summary = document.getElementById("summary");
  const phase = document.getElementById("phase");
  let timer = null, generation = 0, badLines = new Set();
  const library = text.dataset.model, original = text.value;

  function renderGutter() {
    const count = text.value.split("\n").length;
    const lines = [];
    for (let i = 1; i <= count; i++) { lines.push(badLines.has(i) ? `<b>${i}</b>` : String(i)); }
    gutter.innerHTML = lines.join("\n");
    gutter.scrollTop = text.scrollTop;
  }

  function goToLine(line) {
    const offset = text.value.split("\n").slice(0, line - 1).join("\n").length + (line > 1 ? 1 : 0);
    text.focus();
    text.setSelectionRange(offset, offset);
    text.scrollTop = Math.max(0, (line - 5) * parseFloat(getComputedStyle(text).lineHeight));
  }

  function renderTable(layers) {
    const body = document.querySelector("#layers tbody");
    body.replaceChildren();
    for (const l of layers) {
      const row = body.insertRow();
      for (const v of [l.name, l.type, l.top.join("×"), l.params.toLocaleString(),
                       l.flops.toLocaleString()]) { row.insertCell().textContent = v; }
    }
  }

  async function check() {
    const mine = ++generation;
    let result;
    try { result = await api("POST", "/api/models/validate", {prototxt: text.value}); }
    catch (err) { result = {ok: false, errors: [{message: err.message}], layers: [], notes: []}; }
    if (mine !== generation) { return; }          // a newer edit is being checked
    badLines = new Set(result.errors.filter(e => e.line).map(e => e.line));
    problems.replaceChildren();
    for (const e of result.errors) {
      const item = document.createElement("li");
      item.textContent = (e.line ? `line ${e.line}: ` : "") + e.message;
      if (e.line) { item.addEventListener("click", () => goToLine(e.line)); }
      problems.appendChild(item);
    }
    text.classList.toggle("invalid", !result.ok);
    summary.textContent = result.ok
      ? `valid · ${result.params.toLocaleString()} parameters · ${(result.flops / 1e9).toFixed(3)} GFLOPs per image`
      : "";
    for (const note of result.notes || []) { summary.textContent += ` · ${note}`; }
    renderGutter();
    renderTable(result.layers || []);
    if (result.ok) { draw(mine); }
  }

  async function draw(mine) {
    try {
      const response = await fetch("/api/models/draw", {method: "POST",
        headers: {"Content-Type": "application/json"},
        body: JSON.stringify({prototxt: text.value, phase: phase.value})});
      if (response.ok && mine === generation) {
        document.getElementById("svg").innerHTML = await response.text();
      }
    } catch (err) { /* the drawing is optional; validation already reported */ }
  }

  text.addEventListener("input", () => {
    renderGutter();
    clearTimeout(timer);
    timer = setTimeout(check, 350);
  });
  document.getElementById("train-this").addEventListener("submit", async event => {
    event.preventDefault();
    const f = event.target;
    showError(f, null);
    // the library model as it is (its own solver, and pretraining for *_finetune), or the
    // edited text
    const body = {dataset: Number(f.dataset.value), epochs: Number(f.epochs.value)};
    if (library && text.value === original) { body.model = library; }
    else { body.prototxt = text.value; body.name = `${library || "new model"} (edited)`; }
    try {
      const created = await api("POST", "/api/jobs", body);
      location.href = `/jobs/${created.id}`;
    } catch (err) { showError(f, err); }
  });
  text.addEventListener("scroll", () => { gutter.scrollTop = text.scrollTop; });
  phase.addEventListener("change", () => draw(generation));
  renderGutter();
  check();
})();
