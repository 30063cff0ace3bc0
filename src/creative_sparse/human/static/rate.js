// Keyboard shortcuts of the rater page (see creative_sparse.human.app). No inline
// script: the Content Security Policy allows scripts from this server only.
(function () {
  "use strict";
  var form = document.getElementById("vote");
  if (!form) { return; }
  var sent = false;
  var keys = { a: "left", arrowleft: "left", d: "right", arrowright: "right",
               s: "tie", arrowdown: "tie", x: "both_bad" };
  function submit(answer) {
    if (sent) { return; }
    sent = true;  // one vote per page: a held key or a double press sends once
    var button = document.getElementById("answer-" + answer);
    if (form.requestSubmit) { form.requestSubmit(button); } else { button.click(); }
  }
  form.addEventListener("submit", function () { sent = true; });
  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) { return; }
    var key = e.key.toLowerCase();
    if (keys[key]) { e.preventDefault(); submit(keys[key]); return; }
    var m = /^Digit([0-9])$/.exec(e.code || "");
    if (!m) { return; }
    var d = parseInt(m[1], 10);
    var side = e.shiftKey || d === 0 || d > 5 ? "right" : "left";
    var value = d === 0 ? 5 : (d > 5 ? d - 5 : d);
    var input = document.getElementById(side + "-rating-" + value);
    if (input) { e.preventDefault(); input.checked = true; }
  });
})();
