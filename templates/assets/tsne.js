// t-SNE scatter: a thumbnail follows the pointer (or keyboard focus) over a point.
// Thumbnails come from one sprite whose URL and layout are data attributes of the <svg>;
// captions use textContent only, so file names are never parsed as HTML.  No network.
(function () {
  "use strict";
  function init() {
    var svg = document.querySelector(".tsne-scatter");
    var tip = document.querySelector(".tsne-tip");
    if (!svg || !tip) return;
    var thumb = tip.querySelector(".tsne-thumb");
    var cap = tip.querySelector(".tsne-cap");
    var cols = parseInt(svg.getAttribute("data-cols"), 10) || 1;
    var size = parseInt(svg.getAttribute("data-thumb"), 10) || 32;
    var shown = Math.max(96, size);
    var k = shown / size;
    thumb.style.width = shown + "px";
    thumb.style.height = shown + "px";
    thumb.style.backgroundImage = "url(\"" + svg.getAttribute("data-sprite").replace(/["\\]/g, "") + "\")";
    thumb.style.backgroundSize = (cols * shown) + "px auto";
    function pointOf(node) {
      while (node && node !== svg) {
        if (node.getAttribute && node.hasAttribute("data-j")) return node;
        node = node.parentNode;
      }
      return null;
    }
    function show(a, x, y) {
      var j = parseInt(a.getAttribute("data-j"), 10);
      thumb.style.backgroundPosition = (-(j % cols) * size * k) + "px " + (-Math.floor(j / cols) * size * k) + "px";
      cap.textContent = a.getAttribute("data-label") + " · " + a.getAttribute("data-name");
      tip.hidden = false;
      var wrap = svg.parentNode.getBoundingClientRect();
      var left = x - wrap.left + 14, top = y - wrap.top + 14;
      if (left + tip.offsetWidth > wrap.width) left = x - wrap.left - tip.offsetWidth - 14;
      tip.style.left = Math.max(0, left) + "px";
      tip.style.top = Math.max(0, top) + "px";
    }
    svg.addEventListener("mouseover", function (e) {
      var a = pointOf(e.target);
      if (a) show(a, e.clientX, e.clientY);
    });
    svg.addEventListener("mousemove", function (e) {
      var a = pointOf(e.target);
      if (a) show(a, e.clientX, e.clientY); else tip.hidden = true;
    });
    svg.addEventListener("mouseleave", function () { tip.hidden = true; });
    svg.addEventListener("focusin", function (e) {
      var a = pointOf(e.target);
      if (!a) return;
      var r = a.getBoundingClientRect();
      show(a, r.right, r.bottom);
    });
    svg.addEventListener("focusout", function () { tip.hidden = true; });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();
