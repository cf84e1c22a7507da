"use strict";
// An alert's own page (/alert/<vehicle>/<seq>): its facts, the signals the model saw, its verdicts.
const main = $("main");
showAlert($("detail"), main.dataset.vehicle, main.dataset.seq)
  .then(() => { document.body.dataset.loaded = "1"; }).catch(fail);
$("live").className = "live idle"; $("live").textContent = "stored alert";
