// The vargpt-mlx page: plain JavaScript over the server's own OpenAI-compatible API.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "vargpt-mlx-api-key";

// ------------------------------------------------------------------ API calls
function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = localStorage.getItem(KEY_STORE);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function apiError(resp) {
  let msg = resp.status + " " + resp.statusText;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) msg = body.error.message;
  } catch (e) { /* not JSON */ }
  if (resp.status === 401) askKey();
  return new Error(msg);
}

async function postJSON(path, body, signal) {
  const resp = await fetch(path, {
    method: "POST", headers: headers({"Content-Type": "application/json"}), body: JSON.stringify(body), signal,
  });
  if (!resp.ok) throw await apiError(resp);
  return resp;
}

function askKey() {
  const dlg = $("key-dialog");
  if (dlg.open) return;
  $("key-input").value = localStorage.getItem(KEY_STORE) || "";
  dlg.showModal();
}

$("key-dialog").addEventListener("close", () => {
  if ($("key-dialog").returnValue === "ok") {
    const v = $("key-input").value.trim();
    if (v) localStorage.setItem(KEY_STORE, v); else localStorage.removeItem(KEY_STORE);
    loadModel();
  }
});
$("key-button").addEventListener("click", askKey);

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", {headers: headers()});
    if (!resp.ok) throw await apiError(resp);
    const body = await resp.json();
    $("model-name").textContent = body.data.map((m) => m.id).join(", ");
  } catch (e) {
    $("model-name").textContent = "(" + e.message + ")";
  }
}

async function pollHealth() {
  const dot = $("health");
  try {
    const h = await (await fetch("/health")).json();
    dot.className = "dot " + (h.busy ? "busy" : "ok");
    dot.title = h.busy ? `busy (${h.waiting} waiting)` : "ready";
  } catch (e) {
    dot.className = "dot down";
    dot.title = "server unreachable";
  }
}

// ------------------------------------------------------------------ tabs
for (const tab of document.querySelectorAll("[role=tab]")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll("[role=tab]")) {
      const on = t === tab;
      t.setAttribute("aria-selected", on ? "true" : "false");
      $(t.dataset.panel).hidden = !on;
    }
  });
}

// ------------------------------------------------------------------ helpers
function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function imageFigure(src, caption, name) {
  const fig = el("figure");
  const img = el("img");
  img.src = src;
  img.alt = caption;
  const a = el("a");
  a.href = src;
  a.download = name;
  a.appendChild(img);
  fig.appendChild(a);
  fig.appendChild(el("figcaption", "", caption));
  return fig;
}

function intOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : parseInt(v, 10);
}

// ------------------------------------------------------------------ chat
const history = [];       // OpenAI messages sent so far (the server is stateless)
let pending = [];         // data URIs attached to the next message
let controller = null;    // AbortController of the reply being streamed

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  pending.forEach((url, i) => {
    const t = el("span", "thumb");
    const img = el("img");
    img.src = url;
    const x = el("button", "remove", "×");
    x.type = "button";
    x.title = "remove";
    x.addEventListener("click", () => { pending.splice(i, 1); renderAttachments(); });
    t.append(img, x);
    box.appendChild(t);
  });
}

$("chat-attach").addEventListener("change", async (ev) => {
  for (const f of ev.target.files) pending.push(await readAsDataURL(f));
  ev.target.value = "";
  renderAttachments();
});

function addMessage(role) {
  $("chat-empty")?.remove();
  const m = el("div", "msg " + role);
  const body = el("div", "body");
  m.appendChild(body);
  $("messages").appendChild(m);
  return m;
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function setBusy(busy) {
  $("chat-send").hidden = busy;
  $("chat-stop").hidden = !busy;
  $("chat-input").disabled = false;
}

async function sendChat() {
  const text = $("chat-input").value;
  if (!text.trim() && pending.length === 0) return;
  if (controller) return;
  const content = [];
  if (text.trim()) content.push({type: "text", text});
  for (const url of pending) content.push({type: "image_url", image_url: {url}});

  const userMsg = addMessage("user");
  userMsg.querySelector(".body").textContent = text;
  for (const url of pending) {
    const img = el("img", "attached");
    img.src = url;
    userMsg.appendChild(img);
  }
  const userEntry = {role: "user", content};
  $("chat-input").value = "";
  pending = [];
  renderAttachments();

  const messages = [];
  const system = $("chat-system").value.trim();
  if (system) messages.push({role: "system", content: system});
  messages.push(...history, userEntry);

  const req = {model: $("model-name").textContent, messages, stream: true,
               stream_options: {include_usage: true},
               temperature: parseFloat($("chat-temp").value || "0"),
               top_p: parseFloat($("chat-top-p").value || "1"),
               max_tokens: intOrNull("chat-max-tokens") || 512};
  const seed = intOrNull("chat-seed");
  if (seed !== null) req.seed = seed;

  const reply = addMessage("assistant");
  reply.classList.add("streaming");
  const body = reply.querySelector(".body");
  const meta = el("div", "meta");
  reply.appendChild(meta);
  let textSoFar = "";
  const drawn = [];
  controller = new AbortController();
  setBusy(true);
  scrollDown();
  try {
    const resp = await postJSON("/v1/chat/completions", req, controller.signal);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let done = false;
    while (!done) {
      const r = await reader.read();
      if (r.done) break;
      buf += decoder.decode(r.value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith(":")) {           // progress comment while an image is drawn
            meta.textContent = line.slice(1).trim();
            continue;
          }
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          if (obj.usage) {
            meta.textContent = `${obj.usage.prompt_tokens} prompt + ${obj.usage.completion_tokens} tokens`;
          }
          for (const ch of obj.choices || []) {
            const d = ch.delta || {};
            if (d.content) { textSoFar += d.content; body.textContent = textSoFar; }
            for (const im of d.images || []) {
              drawn.push(im);
              reply.insertBefore(imageFigure(im.image_url.url, `drawn image · seed ${im.seed}`,
                                             `vargpt-seed${im.seed}.png`), meta);
            }
            if (d.image_error) reply.insertBefore(el("div", "error", "no image: " + d.image_error), meta);
          }
          scrollDown();
        }
      }
    }
    history.push(userEntry);
    const entry = {role: "assistant", content: textSoFar};
    // the server only needs to know that an image was drawn (not its pixels)
    if (drawn.length) entry.images = drawn.map((im) => ({type: "image_url", seed: im.seed}));
    history.push(entry);
  } catch (e) {
    if (e.name === "AbortError") {
      meta.textContent = "stopped";
      history.push(userEntry, {role: "assistant", content: textSoFar});
    } else {
      reply.appendChild(el("div", "error", e.message));
      userMsg.classList.add("failed");
    }
  } finally {
    reply.classList.remove("streaming");
    controller = null;
    setBusy(false);
    scrollDown();
    pollHealth();
  }
}

$("chat-form").addEventListener("submit", (ev) => { ev.preventDefault(); sendChat(); });
$("chat-input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); sendChat(); }
});
$("chat-stop").addEventListener("click", () => controller && controller.abort());
$("chat-new").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren(el("div", "empty", "New conversation."));
});

// ------------------------------------------------------------------ generate / edit
function showImages(boxId, body, label) {
  const box = $(boxId);
  const note = body.vargpt && body.vargpt.note ? " · " + body.vargpt.note : "";
  [...body.data].reverse().forEach((d) => {  // newest request first, its images in order
    const src = "data:image/png;base64," + d.b64_json;
    box.prepend(imageFigure(src, `${label} · seed ${d.seed} · ${body.size}${note}`, `vargpt-seed${d.seed}.png`));
  });
}

async function runForm(button, errBox, work) {
  const btn = $(button);
  const err = $(errBox);
  err.hidden = true;
  btn.disabled = true;
  const label = btn.textContent;
  btn.textContent = "Working…";
  try {
    await work();
  } catch (e) {
    err.textContent = e.message;
    err.hidden = false;
  } finally {
    btn.disabled = false;
    btn.textContent = label;
    pollHealth();
  }
}

$("gen-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  runForm("gen-submit", "gen-error", async () => {
    const prompt = $("gen-prompt").value;
    const req = {prompt, n: intOrNull("gen-n") || 1, aspect: $("gen-aspect").value, response_format: "b64_json"};
    const seed = intOrNull("gen-seed");
    if (seed !== null) req.seed = seed;
    const body = await (await postJSON("/v1/images/generations", req)).json();
    showImages("gen-results", body, prompt.length > 40 ? prompt.slice(0, 40) + "…" : prompt);
  });
});

$("edit-file").addEventListener("change", async () => {
  const f = $("edit-file").files[0];
  const img = $("edit-preview");
  if (!f) { img.hidden = true; return; }
  img.src = await readAsDataURL(f);
  img.hidden = false;
});

$("edit-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  runForm("edit-submit", "edit-error", async () => {
    const f = $("edit-file").files[0];
    if (!f) throw new Error("choose an image to edit");
    const form = new FormData();
    form.append("image", f, f.name);
    form.append("prompt", $("edit-prompt").value);
    form.append("n", String(intOrNull("edit-n") || 1));
    const seed = intOrNull("edit-seed");
    if (seed !== null) form.append("seed", String(seed));
    const resp = await fetch("/v1/images/edits", {method: "POST", headers: headers(), body: form});
    if (!resp.ok) throw await apiError(resp);
    showImages("edit-results", await resp.json(), "edit");
  });
});

loadModel();
pollHealth();
setInterval(pollHealth, 3000);
