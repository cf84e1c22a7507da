"use strict";
// The sign-in form: a JSON POST (the CSP allows no form submission), then back to the page that sent us here.
$("signin-form").addEventListener("submit", (ev) => { ev.preventDefault();
  post("/api/signin", { password: $("password").value }).then(() => {
    const next = new URLSearchParams(location.search).get("next") || "/";
    // Only a path on this server: "//evil.example" or "/\\evil.example" would leave it.
    location.assign(/^\/(?![\/\\])/.test(next) ? next : "/");
  }).catch((e) => { say($("s-msg"), e.message, false); $("password").value = ""; }); });
$("live").textContent = "";
