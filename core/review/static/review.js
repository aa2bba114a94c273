// The review page's behaviour: filters, order, keyboard, and saving toggles through the API.
(function () {
  "use strict";
  const token = document.querySelector('meta[name="review-token"]').content;
  const readOnly = document.body.dataset.readOnly === "true";
  // the branch (segmenter x critic) shown: every request names it; "" in a run without branches
  const branch = document.body.dataset.branch;
  const branchQuery = branch ? `branch=${encodeURIComponent(branch)}&` : "";
  const branchSelect = document.getElementById("branch");
  const main = document.getElementById("cards");
  const status = document.getElementById("status");
  const filters = ["all", "failed", "overridden"];
  let filter = "all";
  let current = null;

  for (const swatch of document.querySelectorAll(".swatch")) {
    swatch.style.background = swatch.dataset.rgb;  // set from script: the page allows no inline styles
  }

  // the address names the branch shown, so that a reload (or a restarted server opening on
  // another branch) keeps it
  const here = new URL(window.location.href);
  if (branch && here.searchParams.get("branch") === null) {
    here.searchParams.set("branch", branch);
    window.history.replaceState(null, "", here.toString());
  }
  if (branchSelect) {
    document.getElementById("branch-show").hidden = true;  // choosing is enough with the script
    branchSelect.addEventListener("change", () => branchSelect.form.submit());
  }

  function cards() { return Array.from(main.querySelectorAll(".card")); }
  function visible() { return cards().filter((c) => !c.classList.contains("hidden")); }

  function say(text) { status.textContent = text; }

  function focusCard(card) {
    if (current) current.classList.remove("current");
    current = card;
    if (!card) return;
    card.classList.add("current");
    card.focus({ preventScroll: true });
    card.scrollIntoView({ block: "nearest" });
  }

  function applyFilter(name) {
    filter = name;
    for (const b of document.querySelectorAll("button.filter")) b.classList.toggle("active", b.dataset.filter === name);
    for (const c of cards()) {
      const show = name === "all" || c.classList.contains(name);
      c.classList.toggle("hidden", !show);
    }
    if (current && current.classList.contains("hidden")) focusCard(visible()[0] || null);
  }

  function applySort(key) {
    for (const b of document.querySelectorAll("button.sort")) b.classList.toggle("active", b.dataset.sort === key);
    const sorted = cards().sort((a, b) => {
      if (key === "uncertainty") {
        const d = parseFloat(b.dataset.uncertainty) - parseFloat(a.dataset.uncertainty);
        if (d !== 0) return d;
      }
      return parseInt(a.dataset.row, 10) - parseInt(b.dataset.row, 10);
    });
    for (const c of sorted) main.appendChild(c);
  }

  function counts() {
    const all = cards();
    document.getElementById("count-overridden").textContent = all.filter((c) => c.classList.contains("overridden")).length;
    document.getElementById("count-failed").textContent = all.filter((c) => c.classList.contains("failed")).length;
  }

  function render(card, state) {
    card.classList.toggle("overridden", state.overridden);
    card.classList.toggle("failed", Boolean(state.failure));
    card.querySelector(".failure").textContent = state.failure || "";
    for (const c of state.colours) {
      const row = card.querySelector(`tr[data-colour="${c.colour}"]`);
      row.className = c.source;
      const cell = row.querySelector("td.verdict");
      cell.className = "verdict " + (c.verdict || "none");
      cell.textContent = c.verdict || "–";
      if (c.source === "person") {
        const by = document.createElement("span");
        by.className = "by";
        by.textContent = " (person)";
        cell.appendChild(by);
      }
    }
    card.querySelector("img.mask").src = `/mask/${state.sample}.png?${branchQuery}t=${Date.now()}`;
    counts();
  }

  async function post(path, body) {
    const response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Review-Token": token },
      body: JSON.stringify(body),
    });
    const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
    return data;
  }

  async function toggle(card, colour) {
    if (readOnly) { say("read-only: nothing can be changed"); return; }
    const reviewer = document.getElementById("reviewer");
    const comment = card.querySelector("input.comment");
    try {
      const state = await post("/api/toggle", {
        branch: branch,
        sample: parseInt(card.dataset.sample, 10),
        colour: colour,
        reviewer: reviewer ? reviewer.value : "",
        comment: comment ? comment.value : "",
      });
      render(card, state);
      say(`saved: sample ${state.sample}, ${colour}`);
    } catch (err) {
      say(`not saved: ${err.message}`);
    }
  }

  async function reset(card) {
    if (readOnly) return;
    try {
      const state = await post("/api/reset", { branch: branch, sample: parseInt(card.dataset.sample, 10) });
      render(card, state);
      say(`saved: sample ${state.sample} back to the judge's verdicts`);
    } catch (err) {
      say(`not saved: ${err.message}`);
    }
  }

  main.addEventListener("click", (event) => {
    const card = event.target.closest(".card");
    if (!card) return;
    focusCard(card);
    if (event.target.matches("button.toggle")) toggle(card, event.target.dataset.colour);
    else if (event.target.matches("button.reset")) reset(card);
  });
  for (const b of document.querySelectorAll("button.filter")) b.addEventListener("click", () => applyFilter(b.dataset.filter));
  for (const b of document.querySelectorAll("button.sort")) b.addEventListener("click", () => applySort(b.dataset.sort));

  document.addEventListener("keydown", (event) => {
    if (event.target.matches("input, textarea, select") || event.ctrlKey || event.metaKey || event.altKey) return;
    const shown = visible();
    const at = current ? shown.indexOf(current) : -1;
    if (event.key === "j" || event.key === "ArrowDown") {
      focusCard(shown[Math.min(at + 1, shown.length - 1)] || null);
    } else if (event.key === "k" || event.key === "ArrowUp") {
      focusCard(shown[Math.max(at - 1, 0)] || null);
    } else if (/^[1-9]$/.test(event.key) && current) {
      const rows = current.querySelectorAll("tbody tr");
      const row = rows[parseInt(event.key, 10) - 1];
      if (row) toggle(current, row.dataset.colour);
    } else if (event.key === "0" && current) {
      reset(current);
    } else if (event.key === "f") {
      applyFilter(filters[(filters.indexOf(filter) + 1) % filters.length]);
    } else if (event.key === "b" && branchSelect) {
      branchSelect.focus();
    } else if (event.key === "o") {
      const active = document.querySelector("button.sort.active");
      applySort(active && active.dataset.sort === "uncertainty" ? "row" : "uncertainty");
    } else {
      return;
    }
    event.preventDefault();
  });

  focusCard(visible()[0] || null);
})();
