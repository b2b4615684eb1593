// /ui: log in with an API key, then the tenant's jobs, refreshed every few seconds.
"use strict";

function showLogin(message) {
  document.getElementById("login").hidden = false;
  document.getElementById("jobs").hidden = true;
  document.getElementById("login-error").textContent = message || "";
}

async function loadJobs() {
  let page;
  try {
    page = await Trinity.json("/jobs?limit=100");
  } catch (e) {
    if (e.status === 401) { sessionStorage.removeItem(KEY_NAME); localStorage.removeItem(KEY_NAME); showLogin(e.message); return false; }
    Trinity.showError(e);
    return true;
  }
  document.getElementById("login").hidden = true;
  document.getElementById("jobs").hidden = false;
  document.getElementById("empty").hidden = page.data.length > 0;
  const body = document.querySelector("#jobs-table tbody");
  body.replaceChildren(...page.data.map(job => {
    const link = Trinity.el("a", {href: "/ui/jobs/" + encodeURIComponent(job.id), text: job.id});
    const total = job.total_steps || (job.spec.train || {}).max_steps;
    const bar = Trinity.el("progress", {max: total || 1, value: job.step || 0});
    const progress = Trinity.el("span", {}, bar, ` ${job.step || 0}/${total || "?"}` + (job.stage ? ` · ${job.stage}` : ""));
    const status = Trinity.el("span", {class: "status " + job.status, text: job.status});
    return Trinity.row([link, status, (job.spec.model || {}).name_or_path, progress,
                        Trinity.time(job.started_at), Trinity.duration(job)], {"data-job": job.id});
  }));
  document.getElementById("error").textContent = "";
  return true;
}

async function start() {
  if (!Trinity.requireKey()) { showLogin(); return; }
  if (await loadJobs()) setInterval(loadJobs, 3000);
}

document.getElementById("login-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  Trinity.saveKey(document.getElementById("key").value.trim(), document.getElementById("remember").checked);
  document.getElementById("key").value = "";
  const next = sessionStorage.getItem("trinity.next");  // a job page sent us here to log in
  sessionStorage.removeItem("trinity.next");
  if (next && next.startsWith("/ui/jobs/")) { location.href = next; return; }
  await start();
});
start();
