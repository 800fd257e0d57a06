// Lumen chat: conversations in this browser's local storage only; answers streamed from
// /chat/completions (the API's chat completions, as the signed-in account); Markdown rendered by
// marked and sanitised by DOMPurify before it reaches the page.
"use strict";

(() => {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content || "";
  const CSRF = meta("csrf-token");
  const STORE = "lumen.chat.v1:" + meta("lumen-account"); // one list per account in a shared browser
  const $ = (id) => document.getElementById(id);
  const newKey = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);

  let conversations = [];
  let current = null;
  let controller = null;

  function load() {
    try { conversations = JSON.parse(localStorage.getItem(STORE) || "[]"); } catch { conversations = []; }
    if (!Array.isArray(conversations)) conversations = [];
  }
  function save() {
    try { localStorage.setItem(STORE, JSON.stringify(conversations)); } catch { /* full or disabled: keep in memory */ }
  }
  function newConversation() {
    const models = $("model");
    const conversation = { id: String(Date.now()) + Math.random().toString(16).slice(2, 8), title: "New chat",
      model: models.value, system: "", messages: [], updated: Date.now() };
    conversations.unshift(conversation);
    return conversation;
  }

  function renderMarkdown(node, text) {
    const html = window.marked && window.DOMPurify
      ? window.DOMPurify.sanitize(window.marked.parse(text, { gfm: true, breaks: false }))
      : null;
    if (html === null) { node.textContent = text; return; } // libraries missing: plain text, never HTML
    node.innerHTML = html;
    node.querySelectorAll("a[href]").forEach((a) => { a.target = "_blank"; a.rel = "noopener noreferrer"; });
    node.querySelectorAll("pre").forEach((pre) => {
      const block = document.createElement("div");  // the button sits outside the scrolling code
      block.className = "code-block";
      pre.replaceWith(block);
      block.append(pre);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "small copy-code";
      button.textContent = "Copy";
      button.setAttribute("aria-label", "Copy code");
      button.addEventListener("click", () => {
        const code = pre.querySelector("code")?.textContent ?? pre.textContent;
        const done = () => { button.textContent = "Copied"; setTimeout(() => { button.textContent = "Copy"; }, 1500); };
        if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(code).then(done);
        else { const area = document.createElement("textarea"); area.value = code; document.body.appendChild(area);
          area.select(); try { document.execCommand("copy"); done(); } finally { area.remove(); } }
      });
      block.prepend(button);
    });
  }

  function costText(cost) {
    const coins = String(Number(Number(cost.cost).toFixed(6)));  // exact to the micro-coin, as billed
    return `${cost.prompt_tokens} tokens in, ${cost.completion_tokens} out · ${coins} coins` +
      (cost.partial ? " (stopped: the part received was billed)" : "");
  }

  function messageNode(message) {
    const item = document.createElement("div");
    item.className = "message " + message.role;
    if (message.key) item.dataset.key = message.key;
    const who = document.createElement("div");
    who.className = "who-said";
    who.textContent = message.role === "user" ? "You" : message.role === "error" ? "Error" : (message.model || "Assistant");
    const body = document.createElement("div");
    body.className = "body";
    if (message.role === "assistant") renderMarkdown(body, message.content);
    else body.textContent = message.content;
    if (message.role === "error") item.setAttribute("role", "alert");
    item.append(who, body);
    if (message.stopped) {
      const note = document.createElement("div");
      note.className = "stopped muted small";
      note.textContent = "(stopped)";
      item.append(note);
    }
    const foot = document.createElement("div");
    foot.className = "cost muted small";
    if (message.cost) foot.textContent = costText(message.cost);
    item.append(foot);
    return item;
  }

  function renderMessages() {
    const box = $("messages");
    box.replaceChildren();
    if (!current || !current.messages.length) {
      const hint = document.createElement("p");
      hint.className = "muted empty";
      hint.textContent = "Ask anything. Each answer shows what it cost.";
      box.append(hint);
      return;
    }
    current.messages.forEach((m) => box.append(messageNode(m)));
    box.scrollTop = box.scrollHeight;
  }

  function renderList() {
    const list = $("conversations");
    list.replaceChildren();
    conversations.forEach((c) => {
      const item = document.createElement("li");
      if (current && c.id === current.id) item.className = "current";
      const open = document.createElement("button");
      open.type = "button";
      open.className = "link open";
      open.textContent = c.title;
      open.title = c.title;
      if (current && c.id === current.id) open.setAttribute("aria-current", "true");
      open.addEventListener("click", () => select(c.id));
      const rename = document.createElement("button");
      rename.type = "button";
      rename.className = "small";
      rename.textContent = "Rename";
      rename.setAttribute("aria-label", `Rename ${c.title}`);
      rename.addEventListener("click", () => {
        const title = window.prompt("Rename the conversation", c.title);
        if (title && title.trim()) { c.title = title.trim().slice(0, 80); save(); renderList(); }
      });
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "small danger";
      remove.textContent = "Delete";
      remove.setAttribute("aria-label", `Delete ${c.title}`);
      remove.addEventListener("click", () => {
        if (!window.confirm(`Delete “${c.title}” from this browser?`)) return;
        conversations = conversations.filter((x) => x.id !== c.id);
        if (current && current.id === c.id) current = conversations[0] || null;
        save(); showCurrent();
      });
      item.append(open, rename, remove);
      list.append(item);
    });
  }

  function showCurrent() {
    if (current) {
      if ([...$("model").options].some((o) => o.value === current.model)) $("model").value = current.model;
      $("system").value = current.system || "";
    }
    renderList();
    renderMessages();
  }

  function select(id) {
    if (controller) return; // finish or stop the running answer first
    current = conversations.find((c) => c.id === id) || null;
    showCurrent();
  }

  function errorText(status, data, headers) {
    const message = data?.error?.message || `The request failed (${status}).`;
    const wait = headers.get("Retry-After");
    const said = /retry after|try again/i.test(message);
    return status === 429 && wait && !said ? `${message} Try again in ${wait} s.` : message;
  }

  async function fetchCost(requestId, message) {
    for (let attempt = 0; attempt < 15 && requestId; attempt += 1) {
      await new Promise((resolve) => setTimeout(resolve, 300));
      try {
        const response = await fetch(`/usage/request/${encodeURIComponent(requestId)}.json`,
          { credentials: "same-origin", headers: { Accept: "application/json" } });
        if (response.ok) {  // only this answer's line: an answer streaming meanwhile keeps its node
          message.cost = await response.json();
          save();
          const foot = document.querySelector(`#messages [data-key="${message.key}"] .cost`);
          if (foot) foot.textContent = costText(message.cost);
          return;
        }
      } catch { /* try again */ }
    }
  }

  async function send(text) {
    if (!current) current = newConversation();
    current.model = $("model").value;
    current.system = $("system").value;
    if (current.title === "New chat") current.title = text.replace(/\s+/g, " ").slice(0, 40);
    current.messages.push({ role: "user", content: text, key: newKey() });
    const answer = { role: "assistant", content: "", model: current.model, key: newKey() };
    current.messages.push(answer);
    current.updated = Date.now();
    save(); renderList(); renderMessages();

    const wire = current.messages.filter((m) => (m.role === "user" || m.role === "assistant") && m !== answer)
      .map((m) => ({ role: m.role, content: m.content }));
    if (current.system.trim()) wire.unshift({ role: "system", content: current.system });
    controller = new AbortController();
    $("send").hidden = true; $("stop").hidden = false;
    let requestId = null;
    let stopped = false;
    let pending = false;
    const paint = () => { if (pending) return; pending = true;
      requestAnimationFrame(() => {  // looked up each time: a redraw of the list may have replaced it
        pending = false;
        const body = document.querySelector(`#messages [data-key="${answer.key}"] .body`);
        if (body) renderMarkdown(body, answer.content);
        $("messages").scrollTop = $("messages").scrollHeight;
      }); };
    $("messages").setAttribute("aria-busy", "true");
    try {
      const response = await fetch("/chat/completions", {
        method: "POST", credentials: "same-origin", signal: controller.signal,
        headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF, Accept: "text/event-stream" },
        body: JSON.stringify({ model: current.model, messages: wire, stream: true,
          stream_options: { include_usage: true } }),
      });
      requestId = response.headers.get("x-request-id");
      if (!response.ok || !(response.headers.get("Content-Type") || "").includes("text/event-stream")) {
        let data = null;
        try { data = await response.json(); } catch { /* a page, not JSON */ }
        current.messages.pop();
        current.messages.push({ role: "error", content: errorText(response.status, data, response.headers), key: newKey() });
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
          for (const line of event.split(/\r?\n/)) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            let chunk;
            try { chunk = JSON.parse(data); } catch { continue; }
            if (chunk.error) { current.messages.push({ role: "error", content: chunk.error.message || "The stream broke.", key: newKey() }); continue; }
            const delta = chunk.choices?.[0]?.delta?.content;
            if (typeof delta === "string" && delta) { answer.content += delta; paint(); }
          }
        }
      }
    } catch (error) {
      if (error.name === "AbortError") stopped = true;
      else current.messages.push({ role: "error", content: "The connection to Lumen was lost. Try again.", key: newKey() });
    } finally {
      controller = null;
      $("send").hidden = false; $("stop").hidden = true;
      $("messages").removeAttribute("aria-busy");
      if (stopped) {  // shown beside the answer, never sent back to the model
        answer.stopped = true;
        answer.content = answer.content.trimEnd();
      }
      if (!answer.content && current.messages.includes(answer) && !stopped) answer.content = "*(no answer)*";
      save(); renderList(); renderMessages();
      if (requestId && current.messages.includes(answer)) fetchCost(requestId, answer);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (!$("composer")) return;
    load();
    current = conversations[0] || null;
    showCurrent();
    $("new-chat").addEventListener("click", () => { if (controller) return; current = newConversation(); save(); showCurrent(); $("prompt").focus(); });
    $("model").addEventListener("change", () => { if (current) { current.model = $("model").value; save(); } });
    $("system").addEventListener("change", () => { if (current) { current.system = $("system").value; save(); } });
    $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("prompt").value.trim();
      if (!text || controller) return;
      $("prompt").value = "";
      send(text);
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
  });
})();
