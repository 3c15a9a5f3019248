// The panel's only script (no inline scripts: the Content-Security-Policy forbids them).
// 1. Parts marked data-refresh are fetched again every data-every seconds and replaced when they changed,
//    so a page follows work in progress without reloading or flicker.
// 2. The slice scroller asks the server for one rendered PNG per slice (cached there) and prefetches neighbours.
// 3. Selects marked data-autosubmit submit their form on change (the language picker).
"use strict";

function refreshLoop(el) {
  const url = el.dataset.refresh;
  const every = Math.max(1, parseFloat(el.dataset.every || "3")) * 1000;
  let last = el.innerHTML;
  let busy = false;
  async function tick() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const r = await fetch(url, { headers: { "X-Panel-Refresh": "1" }, credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { window.location.reload(); return; }
      if (r.ok) {
        const html = await r.text();
        if (html !== last && !el.contains(document.activeElement)) {
          el.innerHTML = html;
          last = html;
          el.dispatchEvent(new CustomEvent("panel:refreshed", { bubbles: true }));
        }
      }
    } catch (e) { /* the box restarting: try again next tick */ }
    finally { busy = false; }
  }
  setInterval(tick, every);
}

function scroller(root) {
  const img = document.getElementById("slice-img");
  const pos = document.getElementById("slice-pos");
  const label = document.getElementById("slice-label");
  const win = document.getElementById("slice-window");
  const job = document.getElementById("slice-job");
  const base = root.dataset.base;
  const count = parseInt(root.dataset.count, 10);
  const cache = new Map();
  function src(i) {
    const q = new URLSearchParams({ window: win.value });
    if (job.value) q.set("job", job.value);
    return base + i + ".png?" + q.toString();
  }
  function prefetch(i) {
    if (i < 0 || i >= count) return;
    const u = src(i);
    if (!cache.has(u)) { const p = new Image(); p.src = u; cache.set(u, p); if (cache.size > 64) cache.delete(cache.keys().next().value); }
  }
  function show() {
    const i = parseInt(pos.value, 10);
    img.src = src(i);
    label.textContent = (i + 1) + " / " + count;
    prefetch(i + 1); prefetch(i - 1);
  }
  pos.addEventListener("input", show);
  win.addEventListener("change", show);
  job.addEventListener("change", show);
  img.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    pos.value = Math.min(count - 1, Math.max(0, parseInt(pos.value, 10) + (ev.deltaY > 0 ? 1 : -1)));
    show();
  }, { passive: false });
  document.addEventListener("keydown", (ev) => {
    if (ev.target.tagName === "INPUT" && ev.target !== pos) return;
    if (ev.key === "ArrowDown" || ev.key === "PageDown") { pos.value = Math.min(count - 1, parseInt(pos.value, 10) + 1); show(); }
    if (ev.key === "ArrowUp" || ev.key === "PageUp") { pos.value = Math.max(0, parseInt(pos.value, 10) - 1); show(); }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(refreshLoop);
  const sc = document.querySelector(".scroller");
  if (sc) scroller(sc);
  document.querySelectorAll("select[data-autosubmit]").forEach((s) => s.addEventListener("change", () => s.form.submit()));
});
