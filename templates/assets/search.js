// Offline search in the header: layers, channels ("layer3.8:41"), class names and view pages.
// The index is data/search-index.js (a script setting window.SITEGEN_SEARCH), not JSON requested at
// run time: browsers refuse to read local files that way, and the atlas must work from file://.
// Results are built with textContent only: names come from the user's model and image folders.
(function () {
  "use strict";
  var MAX_RESULTS = 12;

  function lower(s) { return String(s == null ? "" : s).toLowerCase(); }

  // 0: exact, 1: prefix, 2: contains; -1: no match.
  function score(text, q) {
    var t = lower(text);
    if (!q || !t) return -1;
    if (t === q) return 0;
    if (t.indexOf(q) === 0) return 1;
    return t.indexOf(q) >= 0 ? 2 : -1;
  }

  function findLayer(layers, name) {
    var q = lower(name);
    for (var i = 0; i < layers.length; i++) {
      if (lower(layers[i].name) === q || (layers[i].caffe && lower(layers[i].caffe) === q)) return layers[i];
    }
    return null;
  }

  // A "layer:channel" query (also "layer channel" or "layer/channel"); the layer part is greedy so a
  // layer name may itself contain ':'.
  function channelHit(layers, query) {
    var m = /^(.*\S)\s*[:\/\s]\s*(\d+)$/.exec(query);
    if (!m) return null;
    var layer = findLayer(layers, m[1]);
    if (!layer) return null;
    var c = parseInt(m[2], 10);
    if (c >= layer.channels) {
      return { text: layer.name + ":" + m[2], detail: "no such channel: " + layer.name + " has channels 0–" + (layer.channels - 1), url: null };
    }
    return { text: layer.name + ":" + c, detail: "channel", url: layer.dir + c + ".html" };
  }

  function search(index, raw) {
    var query = String(raw).trim();
    var q = lower(query);
    if (!q) return [];
    var hits = [];
    var exact = channelHit(index.layers || [], query);
    if (exact) hits.push({ s: -1, i: 0, r: exact });
    (index.layers || []).forEach(function (l, i) {
      var s = score(l.name, q), sc = score(l.caffe, q);
      if (sc >= 0 && (s < 0 || sc < s)) s = sc;
      if (s >= 0) hits.push({ s: s, i: i, r: { text: l.name, detail: (l.caffe ? l.caffe + " · " : "") + l.kind + " · " + l.channels + " channels", url: l.dir + "index.html" } });
    });
    (index.pages || []).forEach(function (p, i) {
      var s = score(p.title, q);
      if (s >= 0) hits.push({ s: s + 0.5, i: 10000 + i, r: { text: p.title, detail: "page", url: p.url } });
    });
    (index.classes || []).forEach(function (c, i) {
      var s = score(c.name, q);
      if (s >= 0) hits.push({ s: s + 0.5, i: 20000 + i, r: { text: c.name, detail: c.where ? "class · " + c.where : "class", url: c.url } });
    });
    hits.sort(function (a, b) { return a.s - b.s || a.i - b.i; });
    return hits.slice(0, MAX_RESULTS).map(function (h) { return h.r; });
  }

  function setup() {
    var box = document.querySelector(".search-box");
    var list = document.getElementById("search-results");
    if (!box || !list) return;
    var index = window.SITEGEN_SEARCH;
    var root = document.body.getAttribute("data-root") || "";
    var results = [];
    var active = -1;

    function close() {
      list.hidden = true;
      box.setAttribute("aria-expanded", "false");
      box.removeAttribute("aria-activedescendant");
      active = -1;
    }

    function highlight(i) {
      var items = list.querySelectorAll("li");
      for (var j = 0; j < items.length; j++) items[j].classList.toggle("active", j === i);
      active = i;
      if (i >= 0 && items[i]) {
        box.setAttribute("aria-activedescendant", items[i].id);
        items[i].scrollIntoView({ block: "nearest" });
      } else {
        box.removeAttribute("aria-activedescendant");
      }
    }

    function show() {
      while (list.firstChild) list.removeChild(list.firstChild);
      results = index ? search(index, box.value) : [];
      if (!box.value.trim()) { close(); return; }
      if (!index) results = [{ text: "search index missing", detail: "data/search-index.js was not found", url: null }];
      if (!results.length) {
        var first = index && index.layers && index.layers[0] ? index.layers[0].name : "conv1";
        results = [{ text: "no match", detail: "try a layer name, layer:channel (e.g. " + first + ":0) or a class", url: null }];
      }
      results.forEach(function (r, i) {
        var li = document.createElement("li");
        li.id = "search-result-" + i;
        li.setAttribute("role", "option");
        var el = document.createElement(r.url ? "a" : "span");
        if (r.url) el.setAttribute("href", root + r.url);
        var t = document.createElement("span");
        t.className = "result-text";
        t.textContent = r.text;
        var d = document.createElement("span");
        d.className = "result-detail";
        d.textContent = r.detail;
        el.appendChild(t);
        el.appendChild(d);
        li.appendChild(el);
        list.appendChild(li);
      });
      list.hidden = false;
      box.setAttribute("aria-expanded", "true");
      highlight(results[0] && results[0].url ? 0 : -1);
    }

    function go(i) {
      var r = results[i];
      if (r && r.url) window.location.href = root + r.url;
    }

    box.addEventListener("input", show);
    box.addEventListener("focus", function () { if (box.value.trim()) show(); });
    box.addEventListener("keydown", function (e) {
      if (e.key === "ArrowDown" || e.key === "ArrowUp") {
        if (list.hidden) show();
        var n = results.length;
        if (!n) return;
        e.preventDefault();
        highlight(e.key === "ArrowDown" ? (active + 1) % n : (active - 1 + n) % n);
      } else if (e.key === "Enter") {
        e.preventDefault();
        if (list.hidden) show();
        go(active >= 0 ? active : 0);
      } else if (e.key === "Escape") {
        if (!list.hidden) { e.preventDefault(); close(); } else { box.value = ""; box.blur(); }
      }
    });
    // Close on a press anywhere outside the box and its results (a press on a result keeps the
    // list open so its link receives the click).
    document.addEventListener("mousedown", function (e) {
      if (!list.contains(e.target) && e.target !== box) close();
    });
    // "/" focuses the box from anywhere, as on many documentation sites.
    document.addEventListener("keydown", function (e) {
      if (e.key !== "/" || e.altKey || e.ctrlKey || e.metaKey) return;
      if (e.target && /INPUT|TEXTAREA|SELECT/.test(e.target.tagName)) return;
      e.preventDefault();
      box.focus();
      box.select();
    });
  }

  window.sitegenSearch = search;  // for tests and the browser console
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", setup);
  else setup();
})();
