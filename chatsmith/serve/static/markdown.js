// A small, safe Markdown renderer (no dependencies, works offline): everything is HTML-escaped
// first, then fenced code, inline code, headings, lists, bold, italics and http(s) links are marked up.
"use strict";
(function () {
  function esc(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }
  function inline(s) {
    const codes = [];
    s = s.replace(/`([^`\n]+)`/g, function (_m, c) { codes.push(c); return "\u0000" + (codes.length - 1) + "\u0000"; });
    s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>");
    s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^)\s]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
    return s.replace(/\u0000(\d+)\u0000/g, function (_m, i) { return "<code>" + codes[+i] + "</code>"; });
  }
  function render(src) {
    const lines = esc(src).split("\n");
    let html = "", para = [], list = null, i = 0;
    function flushPara() { if (para.length) { html += "<p>" + inline(para.join("<br>")) + "</p>"; para = []; } }
    function flushList() { if (list) { html += "</" + list + ">"; list = null; } }
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
      if (fence) {
        flushPara(); flushList();
        const body = [];
        i++;
        while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) { body.push(lines[i]); i++; }
        i++;  // closing fence (or end of a still-streaming block)
        const lang = fence[1] ? ' class="language-' + fence[1] + '"' : "";
        html += "<pre><code" + lang + ">" + body.join("\n") + "</code></pre>";
        continue;
      }
      const h = line.match(/^(#{1,6})\s+(.*)$/);
      const ul = line.match(/^\s*[-*+]\s+(.*)$/);
      const ol = line.match(/^\s*\d+[.)]\s+(.*)$/);
      if (h) { flushPara(); flushList(); html += "<h" + h[1].length + ">" + inline(h[2]) + "</h" + h[1].length + ">"; }
      else if (ul || ol) {
        flushPara();
        const kind = ul ? "ul" : "ol";
        if (list !== kind) { flushList(); html += "<" + kind + ">"; list = kind; }
        html += "<li>" + inline((ul || ol)[1]) + "</li>";
      } else if (!line.trim()) { flushPara(); flushList(); }
      else { flushList(); para.push(line); }
      i++;
    }
    flushPara(); flushList();
    return html;
  }
  window.renderMarkdown = render;
})();
