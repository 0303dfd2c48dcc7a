// unigemma web chat (served at /): streaming chat over /v1/chat/completions (fetch + SSE), voice turns over the
// /v1/realtime WebSocket (PCM16 16 kHz chunks, prefilled on the server while you speak), a small markdown renderer,
// image attach / paste / drop as data URIs, collapsible reasoning, visible tool calls, settings and a conversation
// list kept in localStorage. No external scripts: everything here runs from this file.
// Requests name the model the server lists at GET /v1/models (the server refuses other names, as vLLM does).
// Icons are inline SVG, drawn with lines, so they render without an emoji font.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "unigemma.conversations", SETTINGS = "unigemma.settings";

// --- icons (24x24, stroked in the text colour) -------------------------------------------------------------------
const ICONS = {
  attach: '<path d="M15.5 7.5 8.6 14.4a1.9 1.9 0 0 0 2.7 2.7l7.2-7.2a3.9 3.9 0 0 0-5.5-5.5L5.6 11.8a5.9 5.9 0 0 0 8.3 8.3l5.6-5.6"/>',
  camera: '<path d="M3.5 7.5h4l1.8-2.5h5.4l1.8 2.5h4v11.5h-17z"/><circle cx="12" cy="13" r="3.6"/>',
  mic: '<rect x="9" y="3" width="6" height="11.5" rx="3"/><path d="M5.8 11.5a6.2 6.2 0 0 0 12.4 0M12 17.7V21M8.8 21h6.4"/>',
  tool: '<path d="M14.6 5.2a4 4 0 0 0 4.9 5.3l-8.6 8.6a2 2 0 0 1-2.9-2.9l8.6-8.6a4 4 0 0 0-2-2.4z"/>',
};

function icon(name) {
  const span = document.createElement("span");
  span.className = "icon";
  span.innerHTML = '<svg viewBox="0 0 24 24" width="18" height="18" fill="none" stroke="currentColor" stroke-width="1.8" ' +
    'stroke-linecap="round" stroke-linejoin="round" aria-hidden="true">' + ICONS[name] + "</svg>";
  return span;
}

// --- markdown (a small, safe subset: HTML is escaped first, links are http(s) only) -----------------------------
function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

function inline(s) {
  // s is already escaped; code spans are cut out first so nothing inside them is formatted
  const codes = [];
  s = s.replace(/`([^`]+)`/g, (_, c) => { codes.push(c); return "\u0000" + (codes.length - 1) + "\u0000"; });
  s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
       .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
       .replace(/~~([^~]+)~~/g, "<del>$1</del>")
       .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  return s.replace(/\u0000(\d+)\u0000/g, (_, i) => "<code>" + codes[+i] + "</code>");
}

function renderMarkdown(text) {
  const out = [];
  const parts = text.split(/^```/m);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {  // inside a fence: first line is the language
      const nl = part.indexOf("\n");
      const lang = nl >= 0 ? part.slice(0, nl).trim() : "";
      const body = nl >= 0 ? part.slice(nl + 1) : "";
      out.push('<pre><code class="lang-' + escapeHtml(lang) + '">' + escapeHtml(body.replace(/\n$/, "")) + "</code></pre>");
      return;
    }
    let list = null, para = [];
    const flush = () => {
      if (para.length) { out.push("<p>" + para.map((l) => inline(escapeHtml(l))).join("<br>") + "</p>"); para = []; }
      if (list) { out.push("</" + list + ">"); list = null; }
    };
    for (const line of part.split("\n")) {
      let m;
      if (!line.trim()) { flush(); continue; }
      if ((m = line.match(/^(#{1,6})\s+(.*)$/))) {
        flush(); out.push("<h" + m[1].length + ">" + inline(escapeHtml(m[2])) + "</h" + m[1].length + ">");
      } else if ((m = line.match(/^\s*[-*+]\s+(.*)$/)) || (m = line.match(/^\s*\d+[.)]\s+(.*)$/))) {
        const kind = /^\s*\d/.test(line) ? "ol" : "ul";
        if (para.length) { const l = list; list = null; flush(); list = l; }
        if (list !== kind) { if (list) out.push("</" + list + ">"); out.push("<" + kind + ">"); list = kind; }
        out.push("<li>" + inline(escapeHtml(m[1])) + "</li>");
      } else if ((m = line.match(/^>\s?(.*)$/))) {
        flush(); out.push("<blockquote>" + inline(escapeHtml(m[1])) + "</blockquote>");
      } else {
        if (list) { out.push("</" + list + ">"); list = null; }
        para.push(line);
      }
    }
    flush();
  });
  return out.join("");
}

// --- state ----------------------------------------------------------------------------------------------------
let conversations = [];
let current = null;
let attachments = [];           // data URIs waiting to be sent
let busy = false;
let abortCtl = null;
let voice = null;               // {ws, ctx, stream, node, seconds, bubble}

function load() {
  try { conversations = JSON.parse(localStorage.getItem(STORE) || "[]"); } catch (e) { conversations = []; }
  const s = (() => { try { return JSON.parse(localStorage.getItem(SETTINGS) || "{}"); } catch (e) { return {}; } })();
  if (s.thinking !== undefined) $("opt-thinking").checked = s.thinking;
  if (s.temperature !== undefined) $("opt-temperature").value = s.temperature;
  if (s.imageBudget) $("opt-image-budget").value = String(s.imageBudget);  // null: auto
  if (s.maxTokens) $("opt-max-tokens").value = s.maxTokens;
  if (s.system) $("opt-system").value = s.system;
  if (s.handsfree !== undefined) $("opt-handsfree").checked = s.handsfree;
  if (s.speak !== undefined) $("opt-speak").checked = s.speak;
  $("opt-temperature-value").textContent = $("opt-temperature").value;
}

function settings() {
  return {
    thinking: $("opt-thinking").checked, temperature: parseFloat($("opt-temperature").value),
    imageBudget: parseInt($("opt-image-budget").value, 10) || null,  // null: the checkpoint's default
    maxTokens: parseInt($("opt-max-tokens").value, 10) || 512,
    system: $("opt-system").value.trim(), handsfree: $("opt-handsfree").checked, speak: $("opt-speak").checked,
    apiKey: $("opt-api-key").value.trim(),
  };
}

function saveSettings() {
  const s = settings(); delete s.apiKey;  // the key stays in memory only
  localStorage.setItem(SETTINGS, JSON.stringify(s));
}

function save() {
  // images are kept (data URIs); voice recordings are not, only a marker
  try { localStorage.setItem(STORE, JSON.stringify(conversations)); } catch (e) { setStatus("could not save: " + e.message); }
}

function setStatus(t) { $("status").textContent = t || ""; }
function setBusy(b) {
  busy = b; document.body.dataset.busy = b ? "1" : "0";
  $("send").hidden = b; $("stop").hidden = !b;
}

function newConversation() {
  current = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat", messages: [] };
  conversations.unshift(current); save(); renderList(); renderMessages();
}

function renderList() {
  const ul = $("conversations"); ul.innerHTML = "";
  for (const c of conversations) {
    const li = document.createElement("li");
    li.className = c === current ? "active" : "";
    const span = document.createElement("span"); span.textContent = c.title; li.appendChild(span);
    const del = document.createElement("button"); del.textContent = "×"; del.title = "Delete";
    del.onclick = (e) => {
      e.stopPropagation(); conversations = conversations.filter((x) => x !== c);
      if (current === c) current = conversations[0] || null;
      if (!current) newConversation(); else { save(); renderList(); renderMessages(); }
    };
    li.appendChild(del);
    li.onclick = () => { if (!busy) { current = c; renderList(); renderMessages(); } };
    ul.appendChild(li);
  }
}

// --- rendering messages ------------------------------------------------------------------------------------------
function bubble(role) {
  const div = document.createElement("div"); div.className = "msg " + role;
  div.innerHTML = '<div class="role"></div><div class="media"></div><details class="reasoning" hidden><summary>Reasoning</summary><div class="reasoning-text"></div></details><div class="tools"></div><div class="content"></div>';
  div.querySelector(".role").textContent = role;
  $("messages").appendChild(div);
  return div;
}

function fill(div, m) {
  const media = div.querySelector(".media"); media.innerHTML = "";
  for (const src of m.images || []) {
    const img = document.createElement("img"); img.className = "thumb"; img.src = src; media.appendChild(img);
  }
  if (m.voice) {
    const s = document.createElement("span"); s.className = "muted";
    s.append(icon("mic"), "voice message" + (m.seconds ? ` (${m.seconds.toFixed(1)} s)` : "")); media.appendChild(s);
  }
  const r = div.querySelector(".reasoning");
  if (m.reasoning) { r.hidden = false; r.querySelector(".reasoning-text").innerHTML = renderMarkdown(m.reasoning); }
  const tools = div.querySelector(".tools"); tools.innerHTML = "";
  for (const t of m.tool_calls || []) {
    const d = document.createElement("div"); d.className = "tool-call";
    d.append(icon("tool"), (t.function.name || "?") + "(" + (t.function.arguments || "") + ")");
    tools.appendChild(d);
  }
  const c = div.querySelector(".content");
  if (m.role === "user") c.textContent = m.content || ""; else c.innerHTML = renderMarkdown(m.content || "");
  if (m.error) { const e = document.createElement("div"); e.className = "error"; e.textContent = m.error; c.appendChild(e); }
  $("messages").scrollTop = $("messages").scrollHeight;
}

function renderMessages() {
  $("messages").innerHTML = "";
  for (const m of (current ? current.messages : [])) fill(bubble(m.role), m);
}

// --- OpenAI messages from the conversation ---------------------------------------------------------------------
function apiMessages(s) {
  const out = [];
  if (s.system) out.push({ role: "system", content: s.system });
  for (const m of current.messages) {
    if (m.role === "user") {
      const text = m.voice ? (m.content || "[voice message]") : (m.content || "");
      if (m.images && m.images.length) {
        const budget = "budget" in m ? m.budget : s.imageBudget;  // null / absent: the model's default
        const parts = m.images.map((u) => ({ type: "image_url", image_url: budget ? { url: u, max_soft_tokens: budget } : { url: u } }));
        if (text) parts.push({ type: "text", text });
        out.push({ role: "user", content: parts });
      } else out.push({ role: "user", content: text });
    } else if (m.role === "assistant" && !m.error) {
      const a = { role: "assistant", content: m.content || "" };
      if (m.tool_calls && m.tool_calls.length) a.tool_calls = m.tool_calls;
      out.push(a);
    }
  }
  return out;
}

function headers(s) {
  const h = { "Content-Type": "application/json" };
  if (s.apiKey) h.Authorization = "Bearer " + s.apiKey;
  return h;
}

async function errorMessage(resp) {
  try { return (await resp.json()).error.message; } catch (e) { return resp.status + " " + resp.statusText; }
}

// The id the server serves (GET /v1/models), asked once; asked again after a failure (e.g. before the API key
// was typed in).
let modelId = null;
async function servedModel(s) {
  if (modelId) return modelId;
  const resp = await fetch("/v1/models", { headers: headers(s) });
  if (!resp.ok) throw new Error(await errorMessage(resp));
  const j = await resp.json();
  if (!j.data || !j.data.length) throw new Error("the server lists no model at /v1/models");
  modelId = j.data[0].id;
  $("model-name").textContent = modelId;
  return modelId;
}

function speak(text) {
  if (!settings().speak || !("speechSynthesis" in window) || !text) return;
  window.speechSynthesis.speak(new SpeechSynthesisUtterance(text.replace(/[`*#>]/g, "")));
}

// --- text chat: fetch + SSE -------------------------------------------------------------------------------------
async function sendText() {
  const text = $("input").value.trim();
  if (busy || (!text && !attachments.length)) return;
  const s = settings(); saveSettings();
  const user = { role: "user", content: text, images: attachments.slice(), budget: s.imageBudget };
  current.messages.push(user);
  if (current.title === "New chat") current.title = (text || "image").slice(0, 40);
  $("input").value = ""; attachments = []; renderAttachments(); renderList();
  fill(bubble("user"), user);
  const msg = { role: "assistant", content: "", reasoning: "", tool_calls: [] };
  const div = bubble("assistant");
  setBusy(true); setStatus("…");
  abortCtl = new AbortController();
  try {
    const body = { model: await servedModel(s), messages: apiMessages(s), stream: true, temperature: s.temperature,
                   max_tokens: s.maxTokens, chat_template_kwargs: { enable_thinking: s.thinking },
                   stream_options: { include_usage: true } };
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(s), body: JSON.stringify(body),
                                                      signal: abortCtl.signal });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const reader = resp.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i); buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const d = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
          if (d.content) msg.content += d.content;
          if (d.reasoning_content) msg.reasoning += d.reasoning_content;
          for (const tc of d.tool_calls || []) {
            const t = msg.tool_calls[tc.index] || (msg.tool_calls[tc.index] = { id: tc.id, type: "function", function: { name: "", arguments: "" } });
            if (tc.function && tc.function.name) t.function.name = tc.function.name;
            if (tc.function && tc.function.arguments) t.function.arguments += tc.function.arguments;
          }
          if (chunk.usage) setStatus(`${chunk.usage.prompt_tokens} prompt + ${chunk.usage.completion_tokens} generated tokens`);
          fill(div, msg);
        }
      }
    }
    if (!$("status").textContent || $("status").textContent === "…") setStatus("done");
  } catch (e) {
    if (e.name !== "AbortError") msg.error = String(e.message || e); else setStatus("stopped");
  }
  msg.tool_calls = msg.tool_calls.filter(Boolean);
  fill(div, msg);
  current.messages.push(msg); save();
  setBusy(false);
  speak(msg.content);
}

// --- voice: microphone → PCM16 16 kHz → /v1/realtime -----------------------------------------------------------
function b64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function pcm16(floats) {
  const out = new Int16Array(floats.length);
  for (let i = 0; i < floats.length; i++) { const x = Math.max(-1, Math.min(1, floats[i])); out[i] = x < 0 ? x * 32768 : x * 32767; }
  return new Uint8Array(out.buffer);
}

function wsUrl(s) {
  const u = new URL("/v1/realtime", location.href);
  u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (s.apiKey) u.searchParams.set("api_key", s.apiKey);
  return u.toString();
}

// Hands-free end of turn, in the browser: 20-ms frame RMS against an adaptive noise floor with a 0.5-s hang-over
// (the same rule as unigemma.realtime.EnergyVAD on the server).
class BrowserVAD {
  constructor(rate) {
    this.frame = Math.round(rate * 0.02); this.floor = 0.001; this.ratio = 3; this.minRms = 0.01;
    this.startFrames = 3; this.hangFrames = 25; this.speaking = false; this.run = 0; this.quiet = 0;
    this.buf = new Float32Array(0);
  }
  feed(x) {  // → list of "speech_started" / "speech_stopped"
    const all = new Float32Array(this.buf.length + x.length); all.set(this.buf); all.set(x, this.buf.length);
    const events = []; let i = 0;
    for (; i + this.frame <= all.length; i += this.frame) {
      let e = 0;
      for (let j = i; j < i + this.frame; j++) e += all[j] * all[j];
      const rms = Math.sqrt(e / this.frame);
      const voiced = rms > Math.max(this.minRms, this.floor * this.ratio);
      const a = voiced ? 0.002 : (rms < this.floor ? 0.5 : 0.05);
      this.floor = Math.max(1e-5, (1 - a) * this.floor + a * rms);
      if (!this.speaking) {
        this.run = voiced ? this.run + 1 : 0;
        if (this.run >= this.startFrames) { this.speaking = true; this.quiet = 0; events.push("speech_started"); }
      } else if (voiced) this.quiet = 0;
      else if (++this.quiet >= this.hangFrames) { this.speaking = false; this.run = 0; events.push("speech_stopped"); }
    }
    this.buf = all.slice(i);
    return events;
  }
}

async function startVoice() {
  if (busy || voice) return;
  const s = settings(); saveSettings();
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
  } catch (e) { setStatus("microphone unavailable: " + e.message); return; }
  const ws = new WebSocket(wsUrl(s));
  const user = { role: "user", content: $("input").value.trim(), images: attachments.slice(), budget: s.imageBudget, voice: true, seconds: 0 };
  const v = voice = { ws, stream, seconds: 0, user, opened: false, queue: [], handsfree: s.handsfree, stopped: false };
  $("mic").classList.add("recording"); setBusy(true); setStatus(s.handsfree ? "listening (hands-free)…" : "recording… release to send");
  const send = (obj) => { if (ws.readyState === 1) ws.send(JSON.stringify(obj)); else v.queue.push(obj); };
  v.send = send;
  ws.onopen = () => {
    v.opened = true;
    ws.send(JSON.stringify({ type: "session.update", session: {
      instructions: s.system || null, thinking: s.thinking, temperature: s.temperature, max_tokens: s.maxTokens,
      vad: false, messages: apiMessages({ ...s, system: "" }) } }));  // the page's own VAD ends hands-free turns
    for (const src of user.images) {
      ws.send(JSON.stringify({ type: "input_image.append", image: src, ...(s.imageBudget ? { max_soft_tokens: s.imageBudget } : {}) }));
    }
    if (user.content) ws.send(JSON.stringify({ type: "input_text.append", text: user.content }));
    for (const q of v.queue) ws.send(JSON.stringify(q));
    v.queue = [];
  };
  ws.onmessage = (e) => onVoiceEvent(v, JSON.parse(e.data));
  ws.onerror = () => setStatus("voice connection error");
  ws.onclose = () => { if (voice === v) stopCapture(v); };
  $("input").value = ""; attachments = []; renderAttachments();
  // 16 kHz capture: the browser resamples the microphone for us
  const ctx = new (window.AudioContext || window.webkitAudioContext)({ sampleRate: 16000 });
  v.ctx = ctx;
  const src = ctx.createMediaStreamSource(stream);
  const node = ctx.createScriptProcessor(4096, 1, 1);
  node.onaudioprocess = (ev) => {
    if (!v.capturing) return;
    const data = ev.inputBuffer.getChannelData(0);
    v.seconds += data.length / ctx.sampleRate;
    send({ type: "input_audio.append", audio: b64(pcm16(data)), format: "pcm16" });
    if (v.vad) {
      for (const e of v.vad.feed(data)) {
        if (e === "speech_started") setStatus("hearing you…");
        else { v.heard = true; commitVoice(); }
      }
    }
  };
  if (s.handsfree) v.vad = new BrowserVAD(ctx.sampleRate);
  src.connect(node); node.connect(ctx.destination);
  v.node = node; v.capturing = true;
}

function stopCapture(v) {
  v.capturing = false;
  try { v.node && v.node.disconnect(); } catch (e) { /* already gone */ }
  try { v.ctx && v.ctx.close(); } catch (e) { /* already closed */ }
  for (const t of v.stream.getTracks()) t.stop();
  $("mic").classList.remove("recording");
}

function commitVoice() {
  const v = voice;
  if (!v || !v.capturing) return;
  stopCapture(v);
  v.send({ type: "input.commit" });
  setStatus("thinking…");
}

function onVoiceEvent(v, ev) {
  if (ev.type === "vad.speech_started") setStatus("hearing you…");
  else if (ev.type === "vad.speech_stopped") { stopCapture(v); setStatus("thinking…"); }
  else if (ev.type === "response.created") {
    v.user.seconds = v.seconds;
    current.messages.push(v.user);
    if (current.title === "New chat") current.title = "voice chat";
    renderList();
    fill(bubble("user"), v.user);
    v.msg = { role: "assistant", content: "", reasoning: "", tool_calls: [] };
    v.div = bubble("assistant");
  } else if (ev.type === "response.text.delta") { v.msg.content += ev.delta; fill(v.div, v.msg); }
  else if (ev.type === "response.reasoning.delta") { v.msg.reasoning += ev.delta; fill(v.div, v.msg); }
  else if (ev.type === "response.tool_call") { v.msg.tool_calls.push(ev.tool_call); fill(v.div, v.msg); }
  else if (ev.type === "response.done") {
    if (v.msg) {
      current.messages.push(v.msg); save();
      setStatus(`${ev.usage.prompt_tokens} prompt + ${ev.usage.completion_tokens} generated tokens (${ev.status})`);
      speak(v.msg.content);
    }
    finishVoice(v);
  } else if (ev.type === "error") {
    setStatus("error: " + ev.error.message);
    if (!v.capturing) finishVoice(v);
  }
}

function finishVoice(v) {
  stopCapture(v);
  try { v.ws.close(); } catch (e) { /* closed */ }
  if (voice === v) voice = null;
  setBusy(false);
  if (!v.msg) setStatus(v.stopped ? "stopped listening" : $("status").textContent);
  // hands-free: keep listening for the next turn until the user clicks the microphone again
  if (v.handsfree && !v.stopped && v.msg) setTimeout(() => { if (!voice && !busy) startVoice(); }, 300);
}

// --- attachments -------------------------------------------------------------------------------------------------
function addFiles(files) {
  for (const f of files) {
    if (!f.type.startsWith("image/")) continue;
    const r = new FileReader();
    r.onload = () => { attachments.push(r.result); renderAttachments(); };
    r.readAsDataURL(f);
  }
}

// a camera frame becomes an attachment like any image (sent as a JPEG data URI)
async function snapshot() {
  let stream;
  try { stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } }); }
  catch (e) { setStatus("camera unavailable: " + e.message); return; }
  try {
    const video = document.createElement("video");
    video.muted = true; video.playsInline = true; video.srcObject = stream;
    await video.play();
    await new Promise((r) => (video.readyState >= 2 ? r() : video.addEventListener("loadeddata", r, { once: true })));
    const c = document.createElement("canvas");
    c.width = video.videoWidth || 640; c.height = video.videoHeight || 480;
    c.getContext("2d").drawImage(video, 0, 0, c.width, c.height);
    attachments.push(c.toDataURL("image/jpeg", 0.85)); renderAttachments();
  } finally { for (const t of stream.getTracks()) t.stop(); }
}

function renderAttachments() {
  const box = $("attachments"); box.innerHTML = "";
  attachments.forEach((src, i) => {
    const d = document.createElement("div"); d.className = "att";
    const img = document.createElement("img"); img.src = src; d.appendChild(img);
    const x = document.createElement("button"); x.type = "button"; x.textContent = "×";
    x.onclick = () => { attachments.splice(i, 1); renderAttachments(); };
    d.appendChild(x); box.appendChild(d);
  });
}

// --- wiring --------------------------------------------------------------------------------------------------
function init() {
  load();
  if (conversations.length) current = conversations[0]; else newConversation();
  renderList(); renderMessages(); setBusy(false);
  for (const b of document.querySelectorAll("[data-icon]")) b.appendChild(icon(b.dataset.icon));
  servedModel(settings()).catch(() => {});  // shown beside the name; sending asks again if this failed
  $("composer").onsubmit = (e) => { e.preventDefault(); sendText(); };
  $("input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendText(); } });
  $("stop").onclick = () => { if (abortCtl) abortCtl.abort(); if (voice) voice.send({ type: "response.cancel" }); };
  $("new-chat").onclick = () => { if (!busy) newConversation(); };
  $("attach").onclick = () => $("file-input").click();
  $("camera").onclick = () => snapshot();
  $("file-input").onchange = (e) => { addFiles(e.target.files); e.target.value = ""; };
  $("input").addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) { e.preventDefault(); addFiles(files); }
  });
  const main = $("main");
  main.addEventListener("dragover", (e) => { e.preventDefault(); $("drop-hint").hidden = false; });
  main.addEventListener("dragleave", () => { $("drop-hint").hidden = true; });
  main.addEventListener("drop", (e) => { e.preventDefault(); $("drop-hint").hidden = true; addFiles(e.dataTransfer.files); });
  $("opt-temperature").oninput = () => { $("opt-temperature-value").textContent = $("opt-temperature").value; };
  for (const id of ["opt-thinking", "opt-temperature", "opt-image-budget", "opt-max-tokens", "opt-system", "opt-handsfree", "opt-speak"]) {
    $(id).addEventListener("change", saveSettings);
  }
  // push-to-talk: hold the button; in hands-free mode a click starts listening and the server's VAD ends the turn
  const mic = $("mic");
  mic.addEventListener("pointerdown", (e) => {
    e.preventDefault();
    if (voice && voice.handsfree) {  // a click while listening hands-free ends the conversation loop
      voice.stopped = true;
      if (voice.capturing && voice.seconds > 0.3) commitVoice(); else finishVoice(voice);
      return;
    }
    startVoice();
  });
  mic.addEventListener("pointerup", () => { if (!settings().handsfree) commitVoice(); });
  mic.addEventListener("pointerleave", () => { if (!settings().handsfree && voice && voice.capturing) commitVoice(); });
}

window.unigemma = { renderMarkdown, startVoice, commitVoice, snapshot };  // for tests and the console
init();
