// Lumen portal: copy buttons and the Usage page's live panel. Everything works without it.
"use strict";

function copyFrom(id, button) {
  const node = document.getElementById(id);
  if (!node) return;
  const text = node.value !== undefined && node.tagName === "INPUT" ? node.value : node.textContent;
  const done = () => { const was = button.textContent; button.textContent = "Copied"; setTimeout(() => { button.textContent = was; }, 1500); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => fallbackCopy(node, done));
  } else {
    fallbackCopy(node, done);
  }
}

function fallbackCopy(node, done) {
  const area = document.createElement("textarea");
  area.value = node.tagName === "INPUT" ? node.value : node.textContent;
  document.body.appendChild(area);
  area.select();
  try { document.execCommand("copy"); done(); } finally { area.remove(); }
}

function setGauge(id, part) {
  const gauge = document.getElementById(id);
  if (!gauge || !part) return;
  const used = gauge.querySelector(".used");
  if (used) used.textContent = part.used;
  const meter = gauge.querySelector("meter");
  if (part.limit) meter.value = part.used;
  gauge.dataset.used = part.used;
}

function startLive(panel) {
  const url = panel.dataset.live;
  const stamp = document.getElementById("live-updated");
  const tick = async () => {
    if (document.hidden) return;
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } });
      if (!response.ok) return;
      const data = await response.json();
      setGauge("live-requests", data.requests);
      setGauge("live-tokens", data.tokens);
      setGauge("live-inflight", data.in_flight);
      if (stamp) stamp.textContent = "Updated " + new Date().toLocaleTimeString() + ".";
    } catch (error) { /* offline for a moment: the next tick tries again */ }
  };
  setInterval(tick, 3000);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-copy]").forEach((button) => {
    button.addEventListener("click", () => copyFrom(button.dataset.copy, button));
  });
  const panel = document.querySelector("[data-live]");
  if (panel) startLive(panel);
});
