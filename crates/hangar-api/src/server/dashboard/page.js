// Hangar's dashboard page: redraws its panels and alerts every refresh
// interval from the node (the drawings are SVG made there), and applies a
// new time range or machine as soon as it is chosen.
"use strict";

(() => {
  const body = document.body;
  const url = body.dataset.panels;
  const every = Number(body.dataset.refresh || 10) * 1000;
  const status = document.getElementById("status");

  for (const select of document.querySelectorAll("form.controls select")) {
    select.addEventListener("change", () => select.form.submit());
  }

  async function refresh() {
    try {
      const answer = await fetch(url, {
        credentials: "same-origin",
        headers: { accept: "application/json" },
      });
      if (!answer.ok) {
        throw new Error(`the node answered ${answer.status}`);
      }
      const drawn = await answer.json();
      for (const [id, svg] of Object.entries(drawn.panels)) {
        const into = document.querySelector(`#panel-${id} .body`);
        if (into) {
          into.innerHTML = svg;
        }
      }
      document.getElementById("alerts").innerHTML = drawn.alerts;
      status.textContent = `live, drawn ${new Date().toLocaleTimeString()}`;
      status.className = "live";
      body.dataset.drawn = String(Number(body.dataset.drawn || 0) + 1);
    } catch (e) {
      status.textContent = `not redrawn (${e.message}); retrying`;
      status.className = "stale";
    }
    setTimeout(refresh, every);
  }

  if (url && status) {
    setTimeout(refresh, every);
  }
})();
