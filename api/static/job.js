// /ui/jobs/{id}: one job. Polls the JSON API every second while the job runs (job row + new events
// after the last seq), draws the loss, held-out (eval) loss and lr curves, and stops polling once the
// job has ended.
"use strict";
const JOB_ID = decodeURIComponent(location.pathname.split("/").pop());
const POLL_MS = 1000;
const state = {lastSeq: 0, metrics: [], evals: [], job: null, finished: false};

function setText(id, text) { document.getElementById(id).textContent = text ?? ""; }

function renderJob(job) {
  state.job = job;
  document.title = "Trinity · " + job.id;
  setText("job-id", job.id);
  const status = document.getElementById("status");
  status.textContent = job.status + (job.cancel_requested && !Trinity.terminal(job.status) ? " (cancel requested)" : "");
  status.className = "status " + job.status;
  const total = job.total_steps || (job.spec.train || {}).max_steps || 0;
  const bar = document.getElementById("progress");
  bar.max = total || 1;
  bar.value = job.step || 0;
  setText("progress-text", `step ${job.step || 0}/${total || "?"}` + (job.stage ? ` · ${job.stage}` : "") +
          (job.loss != null ? ` · loss ${Trinity.num(job.loss)}` : "") +
          (job.eta_s != null && !Trinity.terminal(job.status) ? ` · eta ${Math.round(job.eta_s)} s` : ""));
  document.getElementById("cancel").hidden = Trinity.terminal(job.status) || job.status === "cancelling";
  const facts = [
    ["model", (job.spec.model || {}).name_or_path], ["dataset", job.dataset_id], ["queue", job.queue],
    ["queue position", job.queue_position], ["created", Trinity.time(job.created_at)],
    ["started", Trinity.time(job.started_at)], ["finished", Trinity.time(job.finished_at)],
    ["duration", Trinity.duration(job)], ["tokens/s", job.tokens_per_s], ["peak memory (GiB)", job.peak_mem_gib],
    ["resumes", job.resumes],
  ].filter(([, v]) => v !== null && v !== undefined && v !== "");
  document.getElementById("facts").replaceChildren(...facts.flatMap(([k, v]) => [Trinity.el("dt", {text: k}), Trinity.el("dd", {text: v})]));

  setText("rung", job.rung ? `OOM-ladder rung: ${job.rung}` + (job.rung === "recipe" ? " (the spec as written)" : " (downgraded)") : "Not started yet.");
  const settings = job.settings || {};
  document.querySelector("#settings tbody").replaceChildren(
    ...Object.entries(settings).map(([k, v]) => Trinity.row([k, typeof v === "object" ? JSON.stringify(v) : String(v)], {"data-setting": k})));
  document.querySelector("#attempts tbody").replaceChildren(...(job.attempts || []).map((a, i) =>
    Trinity.row([i + 1, a.rung, JSON.stringify(a.settings || {}), a.outcome], {class: a.outcome === "oom" ? "warning" : ""})));
  setText("job-error", job.error ? `${job.error.code}: ${job.error.message}` : "none");
  setText("spec", JSON.stringify(job.spec, null, 2));
}

function addEvents(events) {
  const body = document.querySelector("#events tbody");
  for (const e of events) {
    state.lastSeq = Math.max(state.lastSeq, e.seq);
    if (e.type === "metrics" && typeof e.data.loss === "number") {
      state.metrics.push({step: e.data.step, loss: e.data.loss, lr: e.data.lr});
    }
    if (e.type === "eval" && typeof e.data.eval_loss === "number") {
      state.evals = state.evals.filter(p => p.step !== e.data.step);  // a resumed run re-evaluates a step
      state.evals.push({step: e.data.step, loss: e.data.eval_loss, best: e.data.best_step});
    }
    body.append(Trinity.row([e.seq, Trinity.time(e.time), e.level, e.type, e.message], {class: e.level, "data-seq": e.seq}));
  }
  if (events.some(e => e.type === "metrics" || e.type === "eval")) drawChart();
}

// ── the chart: an SVG drawn here, no library ─────────────────────────────────────────────────
const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawChart() {
  const chart = document.getElementById("loss-chart");
  const W = 720, H = 260, L = 56, R = 60, T = 14, B = 34;
  const pts = state.metrics.slice().sort((a, b) => a.step - b.step);
  const lrs = pts.filter(p => typeof p.lr === "number");
  const evals = state.evals.slice().sort((a, b) => a.step - b.step);
  chart.replaceChildren();
  chart.setAttribute("data-points", pts.length);
  chart.setAttribute("data-lr-points", lrs.length);
  chart.setAttribute("data-eval-points", evals.length);
  if (!pts.length) { chart.append(svg("text", {x: W / 2 - 60, y: H / 2}, "no training steps yet")); return; }
  const total = Math.max(state.job && state.job.total_steps || 0, pts[pts.length - 1].step, 1);
  const all = pts.concat(evals).map(p => p.loss);
  const lo = Math.min(...all), hi = Math.max(...all);
  const pad = (hi - lo) * 0.05 || Math.abs(hi) * 0.05 || 1;
  const y0 = lo - pad, y1 = hi + pad;
  const x = s => L + (W - L - R) * (s / total);
  const y = v => T + (H - T - B) * (1 - (v - y0) / (y1 - y0));
  chart.append(svg("line", {class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B}),
               svg("line", {class: "axis", x1: L, y1: T, x2: L, y2: H - B}),
               svg("text", {x: W / 2 - 15, y: H - 6}, "step"),
               svg("text", {x: L - 4, y: H - B + 14}, "0"), svg("text", {x: W - R - 10, y: H - B + 14}, String(total)),
               svg("text", {x: 4, y: T + 8}, y1.toFixed(3)), svg("text", {x: 4, y: H - B}, y0.toFixed(3)),
               svg("text", {x: L + 6, y: T + 10, fill: "#1f6feb"}, "loss"));
  chart.append(svg("polyline", {class: "loss", points: pts.map(p => `${x(p.step).toFixed(1)},${y(p.loss).toFixed(1)}`).join(" ")}));
  for (const p of pts.length <= 200 ? pts : []) chart.append(svg("circle", {class: "loss-point", cx: x(p.step).toFixed(1), cy: y(p.loss).toFixed(1), r: 2.5, fill: "#1f6feb"}));
  if (evals.length) {  // the held-out loss at each evaluation during training; the best one ringed
    const best = evals[evals.length - 1].best;
    chart.append(svg("polyline", {class: "eval-loss", fill: "none", stroke: "#2da44e", "stroke-width": 2,
                                  points: evals.map(p => `${x(p.step).toFixed(1)},${y(p.loss).toFixed(1)}`).join(" ")}),
                 svg("text", {x: L + 70, y: T + 10, fill: "#2da44e"}, "eval loss"));
    for (const p of evals) {
      chart.append(svg("circle", {class: "eval-point", "data-step": p.step, cx: x(p.step).toFixed(1), cy: y(p.loss).toFixed(1),
                                  r: p.step === best ? 6 : 3.5, fill: p.step === best ? "none" : "#2da44e", stroke: "#2da44e"}));
    }
  }
  if (lrs.length) {
    const lrHi = Math.max(...lrs.map(p => p.lr)) || 1;
    const ly = v => T + (H - T - B) * (1 - v / (lrHi * 1.05));
    chart.append(svg("polyline", {class: "lr", points: lrs.map(p => `${x(p.step).toFixed(1)},${ly(p.lr).toFixed(1)}`).join(" ")}),
                 svg("line", {class: "axis", x1: W - R, y1: T, x2: W - R, y2: H - B}),
                 svg("text", {x: W - R + 4, y: T + 8}, lrHi.toExponential(1)), svg("text", {x: W - R + 4, y: H - B}, "0"),
                 svg("text", {x: L + 46, y: T + 10, fill: "#e36209"}, "lr"));
  }
}

// ── artifacts: fetched with the key, handed to the browser as a blob (no key in any URL) ─────
async function sha256hex(buffer) {
  if (!crypto.subtle) return null;  // not a secure context (plain http on a non-local host)
  const digest = await crypto.subtle.digest("SHA-256", buffer);
  return Array.from(new Uint8Array(digest), b => b.toString(16).padStart(2, "0")).join("");
}

async function download(ev) {
  ev.preventDefault();
  const link = ev.currentTarget, note = link.parentNode.querySelector(".note");
  note.textContent = " downloading…";
  try {
    const r = await Trinity.request(`/jobs/${encodeURIComponent(JOB_ID)}/artifacts/${link.dataset.name.split("/").map(encodeURIComponent).join("/")}`);
    const blob = await r.blob();
    const digest = await sha256hex(await blob.arrayBuffer());
    if (digest && digest !== link.dataset.sha256) { note.textContent = " sha256 mismatch!"; return; }
    const url = URL.createObjectURL(blob);
    const a = Trinity.el("a", {href: url, download: link.dataset.name.split("/").pop()});
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    note.textContent = digest ? " downloaded, sha256 verified" : " downloaded";
    link.setAttribute("data-downloaded", "true");
  } catch (e) { note.textContent = ` failed: ${e.message || e}`; }
}

async function loadArtifacts() {
  const list = await Trinity.json(`/jobs/${encodeURIComponent(JOB_ID)}/artifacts`);
  document.getElementById("artifacts-empty").hidden = list.length > 0;
  document.querySelector("#artifacts tbody").replaceChildren(...list.map(a => {
    const link = Trinity.el("a", {href: "#", class: "download", "data-name": a.name, "data-sha256": a.sha256 || "", "data-size": a.size ?? "", text: a.name});
    link.addEventListener("click", download);
    return Trinity.row([Trinity.el("span", {}, link, Trinity.el("span", {class: "note"})), a.kind, Trinity.bytes(a.size),
                        Trinity.el("span", {class: "mono", text: a.sha256 || ""})]);
  }));
  if (list.some(a => a.name === "report.json")) await loadReport();
}

async function loadReport() {
  const report = await (await Trinity.request(`/jobs/${encodeURIComponent(JOB_ID)}/artifacts/report.json`)).json();
  document.getElementById("report-empty").hidden = true;
  document.getElementById("report").hidden = false;
  const held = report.held_out || {};
  setText("report-held-out", `Held-out split: ${held.rows ?? "?"} conversations, ${held.tokens ?? "?"} assistant tokens scored.`);
  document.querySelector("#fidelity tbody").replaceChildren(...Object.entries(report.models || {}).map(([name, m]) =>
    Trinity.row([name, Trinity.num(m.loss), Trinity.num(m.perplexity, 3), m.top1_agreement ?? "", m.tokens ?? ""], {"data-model": name})));
  document.querySelector("#generations tbody").replaceChildren(...(report.generations || []).map(g =>
    Trinity.row([g.prompt, g.reference, g.base, g.fine_tuned])));
}

// ── polling ──────────────────────────────────────────────────────────────────────────────────
async function poll() {
  try {
    const job = await Trinity.json(`/jobs/${encodeURIComponent(JOB_ID)}`);
    for (let more = true; more;) {
      const page = await Trinity.json(`/jobs/${encodeURIComponent(JOB_ID)}/events?after=${state.lastSeq}&limit=1000`);
      addEvents(page.data);
      more = page.has_more;
    }
    renderJob(job);
    document.getElementById("job").hidden = false;
    setText("error", "");
    if (Trinity.terminal(job.status)) {
      state.finished = true;
      await loadArtifacts();
      document.body.setAttribute("data-loaded", "final");
      return;
    }
    document.body.setAttribute("data-loaded", "live");
  } catch (e) {
    if (e.status === 404) { setText("error", `Job ${JOB_ID} not found.`); document.body.setAttribute("data-loaded", "not-found"); return; }
    if (e.status === 401) { sessionStorage.setItem("trinity.next", location.pathname); location.href = "/ui"; return; }
    Trinity.showError(e);
  }
  setTimeout(poll, POLL_MS);
}

document.getElementById("cancel").addEventListener("click", async () => {
  if (!confirm(`Cancel ${JOB_ID}? A running job stops at its next step and keeps its last checkpoint.`)) return;
  try { renderJob(await (await Trinity.request(`/jobs/${encodeURIComponent(JOB_ID)}/cancel`, {method: "POST"})).json()); }
  catch (e) { Trinity.showError(e); }
});

if (Trinity.requireKey()) poll(); else { sessionStorage.setItem("trinity.next", location.pathname); location.href = "/ui"; }
