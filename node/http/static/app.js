// casemask dashboard: the only script. It (1) refreshes every element that has
// data-refresh="SECONDS" by fetching the same page and swapping that element, unless the
// tab is hidden or the user is typing in it, and (2) asks before a form marked
// data-confirm is sent. Everything works without it, only without refreshing.
(function () {
  "use strict";
  function refresh(el) {
    if (document.hidden || el.contains(document.activeElement) && document.activeElement.tagName !== "BODY") return;
    // X-Casemask-Refresh: the node logs these GETs at DEBUG (node.http.app.REFRESH_HEADER).
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html", "X-Casemask-Refresh": "1" } })
      .then(function (r) { return r.ok && !r.redirected ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById(el.id);
        if (fresh && fresh.innerHTML !== el.innerHTML) el.replaceChildren.apply(el, Array.prototype.slice.call(fresh.childNodes));
      })
      .catch(function () { /* the node is restarting: try again at the next tick */ });
  }
  document.querySelectorAll("[data-refresh][id]").forEach(function (el) {
    var s = Math.max(2, parseInt(el.getAttribute("data-refresh"), 10) || 5);
    window.setInterval(function () { refresh(el); }, s * 1000);
  });
  document.addEventListener("submit", function (ev) {
    var f = ev.target;
    if (f.matches && f.matches("form[data-confirm]") && !window.confirm(f.getAttribute("data-confirm"))) ev.preventDefault();
  });
})();
