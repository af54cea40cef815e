// Keyboard navigation and "copy link"; no network, works from file://.
(function () {
  "use strict";
  document.addEventListener("keydown", function (e) {
    if (e.target && /INPUT|TEXTAREA|SELECT/.test(e.target.tagName)) return;
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    var rel = e.key === "ArrowLeft" ? "prev" : e.key === "ArrowRight" ? "next" : null;
    if (!rel) return;
    var link = document.querySelector('a[rel="' + rel + '"]');
    if (link) { window.location.href = link.href; }
  });
  document.addEventListener("DOMContentLoaded", function () {
    var button = document.querySelector(".copy-link");
    if (!button) return;
    button.addEventListener("click", function () {
      var url = window.location.href;
      var done = function () { button.textContent = "copied"; setTimeout(function () { button.textContent = "copy link"; }, 1500); };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(url).then(done, function () { window.prompt("Copy this link:", url); });
      } else {
        window.prompt("Copy this link:", url);
      }
    });
  });
})();
// Attribution method switch (guided / deconvnet / gradient): every attribution image is a window
// into its channel's sprite, and the method picks the sprite row (CSS --r on [data-attr-rows]).
// The choice is remembered across pages where the browser allows storage (not always on file://).
(function () {
  "use strict";
  var KEY = "sitegen.attribution-method";
  function show(input) {
    var row = input.getAttribute("data-attr-row");
    document.querySelectorAll("[data-attr-rows]").forEach(function (el) { el.style.setProperty("--r", row); });
    document.querySelectorAll("[data-attr-note]").forEach(function (el) {
      el.hidden = el.getAttribute("data-attr-note") !== input.value;
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    var radios = document.querySelectorAll("input[data-attr-row]");
    if (!radios.length) return;
    var saved = null;
    try { saved = window.localStorage.getItem(KEY); } catch (e) { saved = null; }
    radios.forEach(function (input) {
      input.addEventListener("change", function () {
        if (!input.checked) return;
        show(input);
        try { window.localStorage.setItem(KEY, input.value); } catch (e) { /* storage refused: fine */ }
      });
      if (saved && input.value === saved) { input.checked = true; show(input); }
    });
  });
})();
