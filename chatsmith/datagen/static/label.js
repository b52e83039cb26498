// The ranking page of `chatsmith label`. The list order is the ranking (best first); tied[pos]
// says position pos ties with the position above. Keys: the answers' numbers (A=1, B=2, ...) in
// order from best to worst, "=" before a number for a tie, e to edit the best answer, s to skip,
// Escape to start over, Enter to save. Every decision is saved by the server before the next item.
"use strict";

const $ = (id) => document.getElementById(id);
let item = null;        // the item shown: {index, prompt, answers: [{letter, text}], progress}
let order = [];         // answer indices, best first
let tied = [];          // tied[pos]: position pos ties with pos - 1
let placed = 0;         // leading positions set with the keyboard
let tiePending = false; // "=" was pressed: the next number ties with the one above
let edited = null;      // the edited best answer, or null
let busy = false;
let dragFrom = null;

async function fetchItem() {
  try {
    const r = await fetch("/api/item");
    show(await r.json());
  } catch (e) {
    $("status").textContent = "The label server does not answer: " + e;
    setTimeout(fetchItem, 1000);
  }
}

function show(data) {
  $("model").textContent = data.model ? "answers by " + data.model : "";
  const p = data.progress;
  const done = p.ranked + p.skipped;
  $("progress").max = Math.max(1, p.total);
  $("progress").value = done;
  $("progress-text").textContent = `${done} / ${p.total} done · ${p.ranked} ranked · ${p.skipped} skipped`;
  document.body.dataset.state = data.state;
  if (data.state !== "ready") {
    item = null;
    $("item").hidden = true;
    $("status").textContent = data.state === "finished" ? "All prompts are done; the rankings are saved."
      : data.state === "error" ? "Sampling answers failed: " + data.error
      : `Sampling answers for prompt ${data.index + 1}…`;
    if (data.state === "waiting") setTimeout(fetchItem, 400);
    return;
  }
  item = data;
  order = data.answers.map((_, i) => i);
  tied = order.map(() => false);
  placed = 0;
  tiePending = false;
  edited = null;
  $("status").textContent = "";
  $("item").hidden = false;
  $("item").dataset.index = String(data.index);
  $("item-number").textContent = `${data.index + 1} of ${p.total}`;
  $("prompt").textContent = data.prompt.map((m) => (data.prompt.length > 1 ? m.role + ": " : "") + m.content).join("\n\n");
  $("edit-box").hidden = true;
  $("error").textContent = "";
  render();
}

function render() {
  const ol = $("answers");
  ol.textContent = "";
  let rank = 0;
  order.forEach((idx, pos) => {
    if (pos === 0 || !tied[pos]) rank += 1;
    const a = item.answers[idx];
    const li = document.createElement("li");
    li.className = "answer" + (pos < placed ? " placed" : "") + (pos > 0 && tied[pos] ? " tied" : "")
      + (pos === 0 && edited !== null ? " edited-note" : "");
    li.draggable = true;
    li.dataset.letter = a.letter;
    li.dataset.pos = String(pos);
    li.dataset.rank = String(rank);
    const r = document.createElement("span");
    r.className = "rank";
    r.textContent = "#" + rank;
    const letter = document.createElement("span");
    letter.className = "letter";
    letter.textContent = `${a.letter} (${idx + 1})`;
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = pos === 0 && edited !== null ? edited : a.text;
    li.append(r, letter, text);
    if (pos > 0) {
      const tie = document.createElement("label");
      tie.className = "tie";
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = tied[pos];
      box.addEventListener("change", () => { tied[pos] = box.checked; render(); });
      tie.append(box, " tie with above");
      li.append(tie);
    }
    li.addEventListener("dragstart", (e) => { dragFrom = pos; li.classList.add("dragging"); e.dataTransfer.setData("text/plain", a.letter); });
    li.addEventListener("dragend", () => li.classList.remove("dragging"));
    li.addEventListener("dragover", (e) => { e.preventDefault(); li.classList.add("over"); });
    li.addEventListener("dragleave", () => li.classList.remove("over"));
    li.addEventListener("drop", (e) => { e.preventDefault(); move(dragFrom, pos); });
    ol.append(li);
  });
}

function move(from, to) {
  if (from === null || from === to) return;
  const [idx] = order.splice(from, 1);
  order.splice(to, 0, idx);
  placed = 0;
  dragFrom = null;
  render();
}

function place(idx) {
  const cur = order.indexOf(idx);
  if (cur < placed) return; // already ranked with the keyboard
  order.splice(cur, 1);
  order.splice(placed, 0, idx);
  tied[placed] = placed > 0 && tiePending;
  placed += 1;
  tiePending = false;
  render();
}

function reset() {
  order = item.answers.map((_, i) => i);
  tied = order.map(() => false);
  placed = 0;
  tiePending = false;
  edited = null;
  $("edit-box").hidden = true;
  render();
}

function startEdit() {
  $("edit-box").hidden = false;
  $("edit").value = edited !== null ? edited : item.answers[order[0]].text;
  $("edit").focus();
}

function finishEdit() {
  const text = $("edit").value;
  edited = text.trim() && text.trim() !== item.answers[order[0]].text.trim() ? text : null;
  $("edit-box").hidden = true;
  render();
}

async function send(payload) {
  if (busy || !item) return;
  busy = true;
  try {
    const r = await fetch("/api/label", { method: "POST", headers: { "Content-Type": "application/json" },
                                          body: JSON.stringify({ index: item.index, ...payload }) });
    const data = await r.json();
    if (!r.ok) { $("error").textContent = data.error || "not saved"; return; }
    show(data);
  } catch (e) {
    $("error").textContent = "Not saved (the server does not answer): " + e;
  } finally {
    busy = false;
  }
}

function save() {
  if (!$("edit-box").hidden) finishEdit();
  send({ action: "rank", order, tied: tied.map((t, pos) => pos > 0 && t), edited });
}

document.addEventListener("keydown", (e) => {
  if (!item) return;
  if (e.target === $("edit")) {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); finishEdit(); }
    else if (e.key === "Escape") { $("edit-box").hidden = true; }
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (/^[1-9]$/.test(e.key) && Number(e.key) <= item.answers.length) { e.preventDefault(); place(Number(e.key) - 1); }
  else if (e.key === "=") { tiePending = true; }
  else if (e.key === "Enter") { e.preventDefault(); save(); }
  else if (e.key === "s") { send({ action: "skip" }); }
  else if (e.key === "e") { e.preventDefault(); startEdit(); }
  else if (e.key === "Escape") { reset(); }
});
$("save").addEventListener("click", save);
$("skip").addEventListener("click", () => send({ action: "skip" }));
$("reset").addEventListener("click", reset);
$("edit-best").addEventListener("click", startEdit);
$("edit-done").addEventListener("click", finishEdit);
fetchItem();
