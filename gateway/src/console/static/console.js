// Tether console: live updates over server-sent events. Written for this console (no
// framework, no CDN, no build step); served by the gateway from its binary.
//
// An element with data-live="<url>" follows that event stream. Each event's data is a target,
// a newline, then HTML rendered by the gateway's own templates:
//   row      <agent id>\n<tr>   replace the fleet row of that agent, or insert it in order
//   remove   <agent id>         drop the fleet row of that agent
//   replace  <element id>\n<x>  replace that element
//   command  <command id>\n<tr> replace the commands list's row of that command, or append it
// document.body.dataset.live is "open" while every stream is connected (tests wait on it).
(function () {
  "use strict";

  function parse(html) {
    var t = document.createElement("template");
    t.innerHTML = html;
    return t.content.firstElementChild;
  }

  function split(data) {
    var nl = data.indexOf("\n");
    return nl < 0 ? [data, ""] : [data.slice(0, nl), data.slice(nl + 1)];
  }

  function rowOf(tbody, id) {
    var rows = tbody.querySelectorAll("tr[data-agent]");
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].getAttribute("data-agent") === id) return rows[i];
    }
    return null;
  }

  function applyRow(tbody, id, html) {
    var el = parse(html);
    if (!el) return;
    var old = rowOf(tbody, id);
    if (old) {
      old.replaceWith(el);
      return;
    }
    // A new agent: in id order, if it falls on this page.
    var rows = tbody.querySelectorAll("tr[data-agent]");
    var size = parseInt(tbody.getAttribute("data-page-size") || "50", 10);
    var last = tbody.getAttribute("data-last-page") === "true";
    for (var i = 0; i < rows.length; i++) {
      if (id < rows[i].getAttribute("data-agent")) {
        if (i === 0 && document.location.search.indexOf("page=") >= 0 && !/page=1(&|$)/.test(document.location.search)) return;
        tbody.insertBefore(el, rows[i]);
        if (rows.length + 1 > size) tbody.removeChild(tbody.querySelectorAll("tr[data-agent]")[size]);
        return;
      }
    }
    if (last || rows.length < size) tbody.appendChild(el);
  }

  var open = 0;
  var streams = document.querySelectorAll("[data-live]");

  function mark() {
    document.body.dataset.live = open === streams.length ? "open" : "connecting";
  }

  Array.prototype.forEach.call(streams, function (el) {
    var es = new EventSource(el.getAttribute("data-live"));
    var isOpen = false;
    es.onopen = function () {
      if (!isOpen) { isOpen = true; open++; }
      mark();
    };
    es.onerror = function () {
      if (isOpen) { isOpen = false; open--; }
      mark();
    };
    es.addEventListener("row", function (e) {
      var p = split(e.data);
      applyRow(el, p[0], p[1]);
    });
    es.addEventListener("remove", function (e) {
      var old = rowOf(el, e.data);
      if (old) old.remove();
    });
    es.addEventListener("command", function (e) {
      var p = split(e.data);
      var next = parse(p[1]);
      if (!next) return;
      var rows = el.querySelectorAll("tr[data-command]");
      for (var i = 0; i < rows.length; i++) {
        if (rows[i].getAttribute("data-command") === p[0]) {
          rows[i].replaceWith(next);
          return;
        }
      }
      var none = el.querySelector("tr.none");
      if (none) none.remove();
      el.appendChild(next);
    });
    es.addEventListener("replace", function (e) {
      var p = split(e.data);
      var target = document.getElementById(p[0]);
      var next = parse(p[1]);
      if (target && next) target.replaceWith(next);
    });
  });
  mark();

  Array.prototype.forEach.call(document.querySelectorAll("form[data-confirm]"), function (f) {
    f.addEventListener("submit", function (e) {
      if (!window.confirm(f.getAttribute("data-confirm"))) e.preventDefault();
    });
  });

  Array.prototype.forEach.call(document.querySelectorAll("[data-copy]"), function (b) {
    b.addEventListener("click", function () {
      var text = document.getElementById(b.getAttribute("data-copy")).textContent;
      if (navigator.clipboard) {
        navigator.clipboard.writeText(text).then(function () { b.textContent = "Copied"; });
      }
    });
  });
})();
