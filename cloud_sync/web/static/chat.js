"use strict";
// The maintenance assistant's panel (base.html's `assistant` block): a question goes to POST /api/ask, the answer
// comes back with its sources (docs/assistant.md). Answers quote vehicle data, so every text is set with
// textContent and every link with setAttribute, never as HTML. The conversation is kept for this tab
// (sessionStorage) so that following a source's link to a vehicle or an alert page does not lose it.
(() => {
  const panel = $("assistant");
  if (!panel) return;  // the sign-in page has none
  const log = $("chat-log"), form = $("chat-form"), input = $("chat-q"), toggle = $("chat-toggle");
  const KEY = "harvester.chat", KEEP = 20, SHOWN_KEYS = 8;
  let history = [];
  try { history = JSON.parse(sessionStorage.getItem(KEY) || "[]"); } catch (e) { history = []; }
  if (!Array.isArray(history)) history = [];
  const save = () => { try { sessionStorage.setItem(KEY, JSON.stringify(history.slice(-KEEP))); } catch (e) { /* full */ } };

  // On a narrow screen the panel starts folded under the page; its button opens it (and folds it again anywhere).
  function fold(folded) {
    panel.classList.toggle("collapsed", folded);
    toggle.setAttribute("aria-expanded", String(!folded)); toggle.textContent = folded ? "Ask" : "Hide";
  }
  fold(window.matchMedia("(max-width: 900px)").matches);
  toggle.addEventListener("click", () => { fold(!panel.classList.contains("collapsed"));
    if (!panel.classList.contains("collapsed")) input.focus(); });

  // A source's row keys as links where there is a page for them: an alert (vehicle + seq) its alert page, any
  // other row naming a vehicle that vehicle's page.
  function keyItem(table, k) {
    const li = el("li");
    const words = Object.entries(k).map(([n, v]) => n + " " + v).join(", ");
    if (typeof k.vehicle === "string") {
      const a = el("a", "", words);
      a.setAttribute("href", table === "alerts" && Number.isInteger(k.seq) ? alertUrl(k.vehicle, k.seq)
        : vehicleUrl(k.vehicle));
      li.appendChild(a);
    } else li.textContent = words;
    return li;
  }
  function sourceItem(s) {
    const li = el("li", "source " + (s.kind === "kb" ? "kb" : "db"));
    if (s.kind === "kb") {
      li.append(el("span", "what", "document"), " ", el("span", "path", String(s.path || "")), " ",
        el("span", "heading", "“" + String(s.heading || "") + "”"));
      return li;
    }
    const keys = Array.isArray(s.keys) ? s.keys.filter((k) => k && typeof k === "object") : [];
    li.append(el("span", "what", "table"), " ", el("span", "table", String(s.table || "?")), " ",
      el("span", "hint", keys.length ? keys.length + (keys.length === 1 ? " row" : " rows") : "no rows"));
    if (s.query) li.setAttribute("title", String(s.query));
    if (keys.length) {
      const ul = el("ul", "keys");
      for (const k of keys.slice(0, SHOWN_KEYS)) ul.appendChild(keyItem(String(s.table), k));
      if (keys.length > SHOWN_KEYS) ul.appendChild(el("li", "more", "+" + (keys.length - SHOWN_KEYS) + " more"));
      li.appendChild(ul);
    }
    return li;
  }

  function answerItem(question, d) {
    const li = el("li", "answer");
    const unknown = d.intent === "unknown" || /^I don't know\b/.test(String(d.answer || ""));
    if (unknown) { li.classList.add("unknown"); li.appendChild(el("span", "badge", "I don't know")); }
    li.appendChild(el("div", "text", String(d.answer || "")));
    if (Array.isArray(d.clarify) && d.clarify.length) {
      const choices = el("div", "choices");
      for (const c of d.clarify) {
        const b = el("button", "choice", String(c)); b.type = "button";
        // The question again with the choice added: the assistant then finds the one it names.
        b.addEventListener("click", () => ask(question + " (" + c + ")"));
        choices.appendChild(b);
      }
      li.appendChild(choices);
    }
    const sources = Array.isArray(d.sources) ? d.sources : [];
    if (sources.length) {
      const box = el("div", "sources"); box.appendChild(el("span", "label", "sources"));
      const ul = el("ul"); for (const s of sources) if (s && typeof s === "object") ul.appendChild(sourceItem(s));
      box.appendChild(ul); li.appendChild(box);
    } else if (!unknown && !d.error) li.appendChild(el("p", "hint", "no sources"));
    if (d.intent && !unknown) li.appendChild(el("span", "intent hint", "understood as " + d.intent));
    return li;
  }

  function show(entry) {
    log.appendChild(el("li", "question", entry.q));
    if (entry.error) log.appendChild(el("li", "answer error", "Not answered: " + entry.error));
    else log.appendChild(answerItem(entry.q, entry.a));
  }

  let asking = false;
  async function ask(q) {
    q = q.trim();
    if (!q || asking) return;
    asking = true; form.classList.add("busy");
    const qi = el("li", "question", q), wait = el("li", "answer pending", "…");
    log.append(qi, wait); wait.scrollIntoView({ block: "nearest" });
    let entry;
    try { entry = { q, a: await post("/api/ask", { question: q }) }; }
    catch (e) { entry = { q, error: e.message }; }
    qi.remove(); wait.remove(); show(entry);
    log.lastElementChild.scrollIntoView({ block: "nearest" });
    history.push(entry); save();
    asking = false; form.classList.remove("busy");
  }

  for (const entry of history.slice(-KEEP)) { try { show(entry); } catch (e) { /* a stored entry of another shape */ } }
  // While an answer is coming the box keeps what is typed (one question at a time from a tab).
  form.addEventListener("submit", (ev) => { ev.preventDefault();
    if (asking || !input.value.trim()) return;
    const q = input.value; input.value = ""; ask(q); });
  $("chat-clear").addEventListener("click", () => { history = []; save(); log.replaceChildren(); });
})();
