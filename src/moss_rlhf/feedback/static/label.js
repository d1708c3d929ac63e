// moss-rlhf feedback: keyboard labelling for the server-rendered form. Never writes HTML: only textContent,
// .value, .checked and CSS classes. The form works without this script (mouse + submit button).
(() => {
  "use strict";
  const undoForm = document.getElementById("undo-form");
  const form = document.getElementById("judge-form");
  const help = document.getElementById("help");
  const helpToggle = document.getElementById("help-toggle");
  const started = performance.now();
  const task = form ? form.dataset.task : null;
  const cards = form ? Array.from(form.querySelectorAll(".card")) : [];
  const status = document.getElementById("status");
  const rationale = document.getElementById("rationale");
  const editBox = document.getElementById("edit-box");
  const edited = document.getElementById("edited");
  let submitting = false;
  let focus = 0;       // rating: the highlighted card
  let ranking = [];    // ranking: card indexes, best first

  const say = (text) => { if (status) status.textContent = text; };
  const radios = (name) => form ? Array.from(form.querySelectorAll(`input[name="${name}"]`)) : [];
  const checked = (name) => { const r = radios(name).find((x) => x.checked); return r ? r.value : null; };
  const setRadio = (name, value) => radios(name).forEach((r) => { r.checked = r.value === value; });
  const isTyping = (el) => el && (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && !["radio", "checkbox"].includes(el.type)));

  function toggleHelp(show) {
    if (!help) return;
    help.hidden = show === undefined ? !help.hidden : !show;
    if (helpToggle) helpToggle.setAttribute("aria-expanded", String(!help.hidden));
  }

  // ---- pairwise
  function refreshPairwise() {
    const choice = checked("choice");
    const ab = choice === "A" || choice === "B";
    radios("strength").forEach((r) => { r.disabled = !ab; if (!ab) r.checked = false; });
    cards.forEach((card, i) => {
      const mine = (i === 0 && choice === "A") || (i === 1 && choice === "B");
      card.classList.toggle("chosen", mine);
      card.classList.toggle("dimmed", ab && !mine);
      card.classList.toggle("bad", choice === "both_bad");
    });
    say("");
  }

  // ---- rating
  function refreshRating() {
    cards.forEach((card, i) => card.classList.toggle("focused", i === focus));
  }
  function rate(value) {
    const card = cards[focus];
    if (!card) return;
    setRadio(`rating_${card.dataset.cid}`, String(value));
    if (focus < cards.length - 1) focus += 1;
    refreshRating();
    say("");
  }

  // ---- ranking
  function rankInputs() { return cards.map((c) => c.querySelector(".rank-input")); }
  function readRanking() {  // from the inputs, so typing a rank by hand and the keyboard agree
    const pairs = rankInputs().map((input, i) => [parseInt(input.value, 10), i]).filter(([r]) => r > 0);
    pairs.sort((a, b) => a[0] - b[0]);
    ranking = pairs.map(([, i]) => i);
  }
  function refreshRanking() {
    const inputs = rankInputs();
    cards.forEach((card, i) => {
      const pos = ranking.indexOf(i);
      inputs[i].value = pos >= 0 ? String(pos + 1) : "";
      card.querySelector(".rank-badge").textContent = pos >= 0 ? `#${pos + 1}` : "";
      card.classList.toggle("chosen", pos === 0);
    });
    const text = document.getElementById("ranking-text");
    if (text) {
      text.textContent = ranking.length
        ? ranking.map((i) => cards[i].querySelector(".badge").textContent).join("  ›  ")
          + (ranking.length < cards.length ? "   (partial)" : "")
        : "press the response numbers, best first";
    }
    say("");
  }
  function rankNext(index) {
    if (index >= cards.length) return;
    const at = ranking.indexOf(index);
    if (at >= 0) ranking.splice(at, 1); else ranking.push(index);
    refreshRanking();
  }

  // ---- submit
  function problem() {
    if (task === "pairwise" && !checked("choice")) return "Choose A, B, tie or both bad first (keys 1–4).";
    if (task === "rating") {
      const missing = cards.findIndex((c) => !checked(`rating_${c.dataset.cid}`));
      if (missing >= 0) { focus = missing; refreshRating(); return "Rate every response (digits 1–7)."; }
    }
    if (task === "ranking") { readRanking(); if (ranking.length < 2) return "Rank at least two responses (press their numbers)."; }
    return null;
  }
  function submit() {
    if (!form || submitting) return;
    const why = problem();
    if (why) { say(why); return; }
    form.requestSubmit();
  }

  function preferredText() {
    const choice = checked("choice");
    let index = 0;
    if (task === "pairwise" && choice === "B") index = 1;
    if (task === "ranking" && ranking.length) index = ranking[0];
    if (task === "rating") {
      let best = -1;
      cards.forEach((c, i) => { const v = parseInt(checked(`rating_${c.dataset.cid}`) || "0", 10); if (v > best) { best = v; index = i; } });
    }
    const el = cards[index] && cards[index].querySelector(".response-text");
    return el ? el.textContent : "";
  }
  function prefillEdit() {
    // the preferred response, to be edited; the server records an edit only when the text was changed
    if (!edited.value) { edited.value = preferredText(); edited.dataset.prefill = edited.value; }
  }
  function openEdit() {
    if (!editBox || !edited) return;
    editBox.open = true;
    prefillEdit();
    edited.focus();
  }

  if (form) {
    form.addEventListener("submit", (event) => {
      const why = problem();
      if (why) { event.preventDefault(); say(why); return; }
      if (submitting) { event.preventDefault(); return; }
      submitting = true;
      if (edited && edited.value.trim() === (edited.dataset.prefill || "").trim()) edited.value = "";  // unchanged
      document.getElementById("time_ms").value = String(Math.round(performance.now() - started));
      const button = document.getElementById("submit-btn");
      if (button) button.disabled = true;
    });
    form.addEventListener("change", (event) => {
      if (task === "pairwise") refreshPairwise();
      if (task === "ranking" && event.target.classList.contains("rank-input")) { readRanking(); refreshRanking(); }
      if (task === "rating") {
        const card = event.target.closest(".card");
        if (card) { focus = cards.indexOf(card); refreshRating(); }
      }
    });
    if (editBox) editBox.addEventListener("toggle", () => { if (editBox.open) prefillEdit(); });
    if (task === "pairwise") refreshPairwise();
    if (task === "rating") refreshRating();
    if (task === "ranking") { readRanking(); refreshRanking(); }
  }
  if (helpToggle) helpToggle.addEventListener("click", () => toggleHelp());

  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.metaKey || (event.ctrlKey && event.key !== "Enter")) return;
    const key = event.key;
    if (isTyping(event.target)) {
      if (key === "Escape") { event.target.blur(); event.preventDefault(); }
      else if (key === "Enter" && (event.ctrlKey || event.metaKey) && event.target.tagName === "TEXTAREA") { event.preventDefault(); submit(); }
      return;
    }
    let handled = true;
    const lower = key.length === 1 ? key.toLowerCase() : key;
    if (lower === "u" && undoForm) { undoForm.requestSubmit(); }
    else if (key === "?") { toggleHelp(); }
    else if (key === "Escape") { toggleHelp(false); }
    else if (!form) { handled = false; }
    else if (key === "Enter") { submit(); }
    else if (lower === "r" && rationale) { rationale.focus(); }
    else if (lower === "e") { openEdit(); }
    else if (task === "pairwise") {
      const choice = { "1": "A", ArrowLeft: "A", "2": "B", ArrowRight: "B", "3": "tie", ArrowDown: "tie", "=": "tie", "4": "both_bad", "0": "both_bad" }[key];
      const strength = { s: "slightly", m: "much" }[lower];
      if (choice) { setRadio("choice", choice); refreshPairwise(); }
      else if (strength) {
        const c = checked("choice");
        if (c !== "A" && c !== "B") say("Pick A or B first; strength says how much better it is.");
        else setRadio("strength", checked("strength") === strength ? "" : strength);
      } else handled = false;
    } else if (task === "rating") {
      if (/^[1-7]$/.test(key)) rate(parseInt(key, 10));
      else if (key === "ArrowLeft" || key === "ArrowUp") { focus = Math.max(0, focus - 1); refreshRating(); }
      else if (key === "ArrowRight" || key === "ArrowDown") { focus = Math.min(cards.length - 1, focus + 1); refreshRating(); }
      else handled = false;
    } else if (task === "ranking") {
      if (/^[1-9]$/.test(key)) rankNext(parseInt(key, 10) - 1);
      else if (key === "Backspace") { ranking.pop(); refreshRanking(); }
      else handled = false;
    } else handled = false;
    if (handled) event.preventDefault();
  });
  document.documentElement.dataset.ready = "1";  // shortcuts are live (tests wait for this)
})();
