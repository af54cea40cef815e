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
