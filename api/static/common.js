// Shared by the pages: the API key (browser storage only, never in a URL), calls to the JSON API,
// formatting. No framework, no build step, nothing loaded from the internet.
"use strict";
const KEY_NAME = "trinity.api_key";

const Trinity = {
  key() { return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME); },
  saveKey(key, remember) {
    sessionStorage.setItem(KEY_NAME, key);
    if (remember) localStorage.setItem(KEY_NAME, key); else localStorage.removeItem(KEY_NAME);
  },
  logout() { sessionStorage.removeItem(KEY_NAME); localStorage.removeItem(KEY_NAME); location.href = "/ui"; },

  // fetch() with the key; throws {status, code, message} on an error answer.
  async request(path, options = {}) {
    const headers = Object.assign({}, options.headers || {}, {Authorization: "Bearer " + (Trinity.key() || "")});
    const r = await fetch(path, Object.assign({}, options, {headers, cache: "no-store"}));
    if (!r.ok) {
      let body = {};
      try { body = await r.json(); } catch (e) { /* not JSON */ }
      const err = (body && body.error) || {};
      throw {status: r.status, code: err.code || "http_" + r.status, message: err.message || r.statusText};
    }
    return r;
  },
  async json(path) { return (await Trinity.request(path)).json(); },

  el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "text") node.textContent = v; else if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  },
  row(cells, attrs = {}) {
    return Trinity.el("tr", attrs, ...cells.map(c => c instanceof Node ? Trinity.el("td", {}, c) : Trinity.el("td", {text: c ?? ""})));
  },
  time(t) { return t ? new Date(t * 1000).toLocaleString() : ""; },
  duration(job) {
    if (!job.started_at) return "";
    const s = Math.max(0, Math.round((job.finished_at || Date.now() / 1000) - job.started_at));
    const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, sec = s % 60;
    return (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
  },
  bytes(n) {
    if (n === null || n === undefined) return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0, v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : v) + " " + units[i];
  },
  num(x, digits = 4) { return typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(digits)) : (x ?? ""); },
  terminal(status) { return ["succeeded", "failed", "cancelled"].includes(status); },

  // Header: who is logged in and a log-out button; false (and the login redirect) without a key.
  requireKey() {
    const out = document.getElementById("logout");
    out.addEventListener("click", Trinity.logout);
    if (!Trinity.key()) return false;
    out.hidden = false;
    document.getElementById("who").textContent = "key " + Trinity.key().slice(0, 8) + "…";
    return true;
  },
  showError(e) {
    const box = document.getElementById("error");
    box.textContent = e && e.message ? `${e.message} (${e.code || e.status})` : String(e);
  },
};
