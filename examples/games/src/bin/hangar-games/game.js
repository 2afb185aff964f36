// The game page made live: the server renders the game, this script only
// swaps in what it sends over a WebSocket, sends the page's own forms
// over it, and reconnects by itself, asking for what came after the last
// version it saw. Without it the page's forms post as they are.
(() => {
  "use strict";
  const root = document.getElementById("game");
  if (!root) return;
  const code = root.dataset.code;
  const live = document.getElementById("live");
  const error = document.getElementById("error");
  let seen = Number(root.dataset.version) || 0;
  let ws = null;
  let delay = 200;
  let from = null;

  function say(text) {
    error.textContent = text || "";
    error.hidden = !text;
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(`${proto}//${location.host}/g/${code}/ws?seen=${seen}`);
    ws.onopen = () => {
      delay = 200;
      document.body.dataset.live = "yes";
      live.textContent = "● live";
    };
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m.type === "state" && m.game.version > seen) {
        seen = m.game.version;
        root.dataset.version = String(seen);
        root.innerHTML = m.html;
        from = null;
        say("");
      } else if (m.type === "error") {
        say(m.error);
      }
    };
    ws.onclose = () => {
      document.body.dataset.live = "no";
      live.textContent = "○ reconnecting";
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 2000);
    };
  }

  function send(ask) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(ask));
    return true;
  }

  root.addEventListener("submit", (e) => {
    const form = e.target;
    const what = form.dataset.ws;
    if (!what) return;
    const data = new FormData(form, e.submitter);
    const ask = what === "rematch"
      ? { rematch: true, round: Number(data.get("round")) }
      : { move: String(data.get("move") || "").trim(), n: Number(data.get("n")) };
    if (send(ask)) e.preventDefault();
  });

  // Chess: a click on a piece, then on where it goes.
  root.addEventListener("click", (e) => {
    const sq = e.target.closest("[data-sq]");
    const board = root.querySelector(".board.chess");
    if (!sq || !board || !board.dataset.legal) return;
    const legal = board.dataset.legal.split(" ");
    const name = sq.dataset.sq;
    if (from) {
      const mv = from + name;
      const pick = legal.includes(mv) ? mv : legal.includes(mv + "q") ? mv + "q" : null;
      root.querySelectorAll(".from").forEach((n) => n.classList.remove("from"));
      from = null;
      if (pick) send({ move: pick, n: Number(board.dataset.n) });
    } else if (legal.some((m) => m.startsWith(name))) {
      from = name;
      sq.classList.add("from");
    }
  });

  connect();
})();
