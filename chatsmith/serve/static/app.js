// The chatsmith web chat: streams answers from /v1/chat/completions (same origin, no CDN).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const chat = $("chat"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop"), statusEl = $("status");
  const SETTINGS = ["system", "temperature", "top_p", "top_k", "max_tokens", "seed", "api_key", "use_kb"];
  let history = [];          // [{role, content}] of the conversation so far (system prompt not included)
  let controller = null;     // AbortController of the answer being streamed
  let modelName = null;
  let kbAvailable = false;    // the server answers from a knowledge base (serve --kb)

  function loadSettings() {
    for (const k of SETTINGS) {
      const v = localStorage.getItem("chatsmith." + k);
      if (v === null) continue;
      if ($(k).type === "checkbox") $(k).checked = v === "true"; else $(k).value = v;
    }
  }
  function saveSettings() {
    for (const k of SETTINGS) localStorage.setItem("chatsmith." + k, $(k).type === "checkbox" ? $(k).checked : $(k).value);
  }
  function headers() {
    const h = { "Content-Type": "application/json" };
    if ($("api_key").value) h["Authorization"] = "Bearer " + $("api_key").value;
    return h;
  }
  function setStatus(text, isError) { statusEl.textContent = text; statusEl.className = isError ? "error" : "muted"; }

  async function copyText(text, btn) {
    try {
      if (navigator.clipboard && window.isSecureContext) await navigator.clipboard.writeText(text);
      else {
        const ta = document.createElement("textarea");
        ta.value = text; document.body.appendChild(ta); ta.select(); document.execCommand("copy"); ta.remove();
      }
      btn.textContent = "Copied";
    } catch (e) { btn.textContent = "Copy failed"; }
    setTimeout(() => { btn.textContent = btn.dataset.label; }, 1200);
  }
  function button(label, title, onClick) {
    const b = document.createElement("button");
    b.type = "button"; b.textContent = label; b.dataset.label = label; b.title = title;
    b.addEventListener("click", onClick);
    return b;
  }

  function addMessage(role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    const r = document.createElement("div"); r.className = "role"; r.textContent = role;
    const body = document.createElement("div"); body.className = "content";
    const note = document.createElement("div"); note.className = "note";
    const tools = document.createElement("div"); tools.className = "tools";
    const msg = { div, body, note, text: text || "" };
    tools.appendChild(button("Copy", "Copy this message", (ev) => copyText(msg.text, ev.currentTarget)));
    div.append(r, tools, body, note);
    chat.appendChild(div);
    setText(msg, msg.text);
    return msg;
  }
  function setText(msg, text) {
    msg.text = text;
    msg.body.innerHTML = window.renderMarkdown(text);
    if (msg.sources && msg.sources.length) linkCitations(msg.body, msg.sources);
    for (const pre of msg.body.querySelectorAll("pre")) {
      const code = pre.textContent;
      const b = button("Copy", "Copy this code", (ev) => copyText(code, ev.currentTarget));
      b.className = "copy-code";
      pre.appendChild(b);
    }
    chat.scrollTop = chat.scrollHeight;
  }

  // Knowledge-base answers: the sources arrive with the first chunk; they are listed as links
  // under the answer, and each [n] in the answer's text (outside code) links to source n.
  function sourceLabel(s) {
    return s.source + (s.heading ? " \u203a " + s.heading : "") + (s.location ? " (" + s.location + ")" : "");
  }
  function showSources(msg, sources) {
    msg.sources = sources;
    if (msg.sourcesEl) msg.sourcesEl.remove();
    if (!sources.length) return;
    const box = document.createElement("div"); box.className = "sources";
    const title = document.createElement("div"); title.className = "role"; title.textContent = "sources";
    const ol = document.createElement("ol");
    for (const s of sources) {
      const li = document.createElement("li"); li.value = s.n;
      const a = document.createElement("a");
      a.href = s.url; a.target = "_blank"; a.rel = "noopener"; a.textContent = sourceLabel(s); a.title = s.text;
      li.appendChild(a); ol.appendChild(li);
    }
    box.append(title, ol);
    msg.div.insertBefore(box, msg.note);
    msg.sourcesEl = box;
  }
  function linkCitations(root, sources) {
    const byN = new Map(sources.map((s) => [String(s.n), s]));
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    const nodes = [];
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
      if (!n.parentElement.closest("pre, code, a") && /\[\d+\]/.test(n.nodeValue)) nodes.push(n);
    }
    for (const node of nodes) {
      const frag = document.createDocumentFragment();
      let last = 0;
      node.nodeValue.replace(/\[(\d+)\]/g, (m, num, at) => {
        const s = byN.get(num);
        if (!s) return m;
        frag.append(node.nodeValue.slice(last, at));
        const a = document.createElement("a");
        a.className = "cite"; a.href = s.url; a.target = "_blank"; a.rel = "noopener"; a.textContent = m;
        a.title = sourceLabel(s);
        frag.append(a);
        last = at + m.length;
        return m;
      });
      frag.append(node.nodeValue.slice(last));
      node.replaceWith(frag);
    }
  }
  window.linkCitations = linkCitations;

  function busy(on) {
    sendBtn.disabled = on; stopBtn.hidden = !on;
    if (on) stopBtn.focus(); else input.focus();
  }

  function requestBody() {
    const messages = [];
    const sys = $("system").value.trim();
    if (sys) messages.push({ role: "system", content: sys });
    const body = { messages: messages.concat(history), stream: true, stream_options: { include_usage: true } };
    if (modelName) body.model = modelName;
    const num = (id, parse) => { const v = $(id).value; return v === "" ? undefined : parse(v); };
    body.temperature = num("temperature", parseFloat);
    body.top_p = num("top_p", parseFloat);
    body.top_k = num("top_k", (v) => parseInt(v, 10));
    body.max_tokens = num("max_tokens", (v) => parseInt(v, 10));
    body.seed = num("seed", (v) => parseInt(v, 10));
    if (kbAvailable) body.kb = $("use_kb").checked;
    return body;
  }

  async function send(text) {
    history.push({ role: "user", content: text });
    addMessage("user", text);
    const msg = addMessage("assistant", "");
    msg.div.setAttribute("aria-busy", "true");
    controller = new AbortController();
    busy(true);
    setStatus("generating…");
    let answer = "", finish = null, usage = null;
    const started = performance.now();
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
      });
      if (!resp.ok) {
        let detail = resp.statusText;
        try { detail = (await resp.json()).error.message; } catch (e) { /* not JSON */ }
        throw new Error("HTTP " + resp.status + ": " + detail);
      }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") continue;
            const obj = JSON.parse(data);
            if (obj.error) throw new Error(obj.error.message);
            if (obj.usage) usage = obj.usage;
            if (obj.sources) showSources(msg, obj.sources);
            for (const c of obj.choices || []) {
              if (c.delta && c.delta.content) { answer += c.delta.content; setText(msg, answer); }
              if (c.finish_reason) finish = c.finish_reason;
            }
          }
        }
      }
      const secs = (performance.now() - started) / 1000;
      msg.note.textContent = (usage ? usage.completion_tokens + " tokens, " : "") + secs.toFixed(1) + " s" +
        (finish === "length" ? " (stopped at max tokens)" : "");
      setStatus("");
    } catch (e) {
      if (e.name === "AbortError") { msg.note.textContent = "(stopped)"; setStatus("stopped"); }
      else { msg.note.textContent = "error: " + e.message; msg.note.className = "note error"; setStatus(e.message, true); }
    } finally {
      msg.div.removeAttribute("aria-busy");
      msg.div.dataset.done = "true";
      if (answer) history.push({ role: "assistant", content: answer });
      controller = null;
      busy(false);
    }
  }

  function stop() { if (controller) controller.abort(); }

  function download(name, type, text) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([text], { type }));
    a.download = name; document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  }
  function conversation() {
    const sys = $("system").value.trim();
    return (sys ? [{ role: "system", content: sys }] : []).concat(history);
  }
  function exportJSON() {
    download("conversation.json", "application/json", JSON.stringify({ model: modelName, messages: conversation() }, null, 2));
  }
  function exportMarkdown() {
    const md = conversation().map((m) => "**" + m.role + "**\n\n" + m.content).join("\n\n---\n\n");
    download("conversation.md", "text/markdown", md + "\n");
  }
  function newChat() { stop(); history = []; chat.innerHTML = ""; setStatus("new conversation"); input.focus(); }

  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    input.value = "";
    send(text);
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && controller) { ev.preventDefault(); stop(); }
    else if (ev.ctrlKey && ev.shiftKey && (ev.key === "O" || ev.key === "o")) { ev.preventDefault(); newChat(); }
    else if (ev.ctrlKey && ev.key === ",") { ev.preventDefault(); $("toggle-settings").click(); }
  });
  stopBtn.addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("export-json").addEventListener("click", exportJSON);
  $("export-md").addEventListener("click", exportMarkdown);
  $("toggle-settings").addEventListener("click", (ev) => {
    const s = $("settings"); s.hidden = !s.hidden; ev.currentTarget.setAttribute("aria-expanded", String(!s.hidden));
  });
  for (const k of SETTINGS) $(k).addEventListener("change", saveSettings);

  async function connect() {
    try {
      const resp = await fetch("/v1/models", { headers: headers() });
      if (resp.status === 503) { $("model").textContent = "loading the model…"; setTimeout(connect, 1500); return; }
      if (!resp.ok) { $("model").textContent = "not connected (HTTP " + resp.status + "; API key?)"; return; }
      const data = await resp.json();
      modelName = data.data[0].id;
      $("model").textContent = modelName;
      const kb = await fetch("/v1/kb", { headers: headers() });
      const info = kb.ok ? await kb.json() : { available: false };
      if (info.available) {
        kbAvailable = true;
        $("kb-setting").hidden = false;
        $("kb-name").textContent = info.name + ", " + info.chunks + " chunks";
      }
    } catch (e) { $("model").textContent = "server unreachable"; setTimeout(connect, 3000); }
  }
  loadSettings();
  connect();
  input.focus();
})();
