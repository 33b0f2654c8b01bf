// chatforge web chat: talks to the server's OpenAI-compatible API (streamed) and records every conversation and
// piece of feedback in its feedback store (/feedback/...). No framework, no external network.
"use strict";

const state = {
  config: null,
  key: localStorage.getItem("chatforge-key") || "",
  conv: null,        // {id, title, messages: [...], rankings: [...]} as the server returns it
  selected: {},      // parent id ("root" for the first message) -> index of the shown item among its children
  path: [],          // messages on screen, first to last (what the next request continues)
  pendingGroup: null, // compare-mode answers still waiting for a ranking
  abort: null,       // AbortController of the answer being streamed
  busy: false,
};
const $ = (id) => document.getElementById(id);

function setStatus(text, isError) {
  $("status").textContent = text || "";
  $("status").className = isError ? "error" : "";
}
function showError(e) { setStatus(e.message || String(e), true); }

function askKey() {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-form").onsubmit = () => {
      state.key = $("key-input").value.trim();
      localStorage.setItem("chatforge-key", state.key);
      resolve();
    };
    if (!dialog.open) dialog.showModal();
  });
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

async function errorMessage(res) {
  const data = await res.json().catch(() => ({}));
  return (data.error && data.error.message) || `${res.status} ${res.statusText}`;
}

async function api(method, path, body) {
  const res = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) });
  if (res.status === 401) { await askKey(); return api(method, path, body); }
  if (!res.ok) throw new Error(await errorMessage(res));
  return res.json();
}

// ---- the conversation tree ------------------------------------------------------------------------------------

// The children of a message as "items": a single message, or the answers of one compare turn together.
function items(parentId) {
  const out = [];
  const groups = {};
  for (const m of state.conv.messages) {
    if (m.parent_id !== parentId) continue;
    if (m.compare_group) {
      if (!groups[m.compare_group]) { groups[m.compare_group] = []; out.push(groups[m.compare_group]); }
      groups[m.compare_group].push(m);
    } else {
      out.push([m]);
    }
  }
  for (const item of out) item.sort((a, b) => (a.compare_index || 0) - (b.compare_index || 0));
  return out;
}

function rankingOf(group) {
  return state.conv.rankings.find((r) => r.message_ids.includes(group[0].id)) || null;
}

function render() {
  const box = $("messages");
  box.textContent = "";
  state.path = [];
  state.pendingGroup = null;
  if (!state.conv) {
    const hint = document.createElement("p");
    hint.className = "hint";
    hint.textContent = "Send a message to start a conversation.";
    box.append(hint);
    updateComposer();
    return;
  }
  let parentId = null;
  for (;;) {
    const choices = items(parentId);
    if (!choices.length) break;
    const key = parentId || "root";
    const index = Math.min(state.selected[key] ?? choices.length - 1, choices.length - 1);
    const item = choices[index];
    const nav = choices.length > 1 ? { key, index, count: choices.length } : null;
    let shown;
    if (item[0].compare_group) {
      const ranking = rankingOf(item);
      box.append(compareRow(item, ranking, nav));
      if (!ranking) { state.pendingGroup = item; break; }
      shown = item.find((m) => m.id === ranking.message_ids[ranking.ranking[0]]);
    } else {
      shown = item[0];
      box.append(messageEl(shown, nav));
    }
    state.path.push(shown);
    parentId = shown.id;
  }
  markLastAnswer();
  updateComposer();
  box.scrollTop = box.scrollHeight;
}

function markLastAnswer() {
  const last = state.path[state.path.length - 1];
  document.querySelectorAll(".regenerate").forEach((b) => { b.hidden = !last || b.dataset.id !== last.id; });
}

function updateComposer() {
  $("send").disabled = state.busy || !!state.pendingGroup;
  $("stop").hidden = !state.busy;
  $("input").placeholder = state.pendingGroup ? "Rank the answers above to continue"
    : "Send a message (Enter to send, Shift+Enter for a new line)";
}

function button(label, title, onClick, cls) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  if (cls) b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

function navEl(nav) {
  const span = document.createElement("span");
  span.className = "nav";
  if (!nav) return span;
  const go = (delta) => () => { state.selected[nav.key] = (nav.index + delta + nav.count) % nav.count; render(); };
  span.append(button("‹", "previous version", go(-1)), ` ${nav.index + 1}/${nav.count} `, button("›", "next version", go(1)));
  return span;
}

function messageEl(m, nav) {
  const el = document.createElement("div");
  el.className = `msg role-${m.role}`;
  el.dataset.id = m.id;
  const who = document.createElement("div");
  who.className = "who";
  who.append(m.role === "assistant" ? (m.model || "assistant") : m.role, navEl(nav));
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = m.content;
  const actions = document.createElement("div");
  actions.className = "actions";
  if (m.role === "assistant") {
    actions.append(
      button("Copy", "copy the answer", () => copy(m), "copy"),
      button("▲ Good", "thumbs up", () => rate(m, m.rating === 1 ? 0 : 1), "thumbs-up" + (m.rating === 1 ? " active" : "")),
      button("▼ Bad", "thumbs down", () => rate(m, m.rating === -1 ? 0 : -1), "thumbs-down" + (m.rating === -1 ? " active" : "")),
      button("Edit", "rewrite this answer as it should have been", () => editInPlace(el, m, "Save answer", saveAnswerEdit), "edit"),
    );
    const regen = button("Regenerate", "ask for another answer", () => regenerate(m), "regenerate");
    regen.dataset.id = m.id;
    actions.append(regen);
    if (m.edited) actions.append(Object.assign(document.createElement("span"), { className: "muted", textContent: "edited" }));
    if (m.author === "human") actions.append(Object.assign(document.createElement("span"), { className: "muted", textContent: "written by a person" }));
  } else if (m.role === "user") {
    actions.append(button("Edit", "edit and resubmit", () => editInPlace(el, m, "Save & submit", resubmit), "edit"));
  }
  el.append(who, body, actions);
  return el;
}

function editInPlace(el, m, label, save) {
  const body = el.querySelector(".body");
  const area = document.createElement("textarea");
  area.value = m.content;
  const done = document.createElement("div");
  done.className = "actions";
  done.append(
    button(label, "", () => save(m, area.value), "save-edit"),
    button("Cancel", "", () => render(), "cancel-edit"),
  );
  body.replaceWith(area);
  el.querySelector(".actions").replaceWith(done);
  area.focus();
}

function compareRow(group, ranking, nav) {
  const wrap = document.createElement("div");
  const row = document.createElement("div");
  row.className = "compare-row";
  row.style.setProperty("--k", group.length);
  const order = ranking ? ranking.ranking : [];
  const picks = [];
  const bar = document.createElement("div");
  bar.className = "ranking-bar";
  const submit = button("Submit ranking", "save this order (best first)", () => submitRanking(group, picks), "submit-ranking");
  submit.id = "submit-ranking";
  submit.disabled = true;
  group.forEach((m, i) => {
    const col = document.createElement("div");
    col.className = "compare-col";
    col.dataset.id = m.id;
    const rank = document.createElement("div");
    rank.className = "rank";
    const body = document.createElement("div");
    body.className = "body";
    body.textContent = m.content;
    col.append(rank, body);
    if (ranking) {
      rank.textContent = `#${order.indexOf(i) + 1}`;
      if (order[0] === i) col.classList.add("best");
    } else {
      col.append(button("Rank next", "click the answers from best to worst", () => {
        if (picks.includes(i)) return;
        picks.push(i);
        rank.textContent = `#${picks.length}`;
        submit.disabled = picks.length !== group.length;
      }, "rank-btn"));
    }
    row.append(col);
  });
  if (!ranking) {
    bar.append(
      Object.assign(document.createElement("span"), { textContent: "Click “Rank next” on the answers from best to worst, then" }),
      submit,
      button("Reset", "start the ranking over", () => render(), "reset-ranking"),
    );
  } else {
    bar.append(Object.assign(document.createElement("span"), { className: "muted", textContent: "ranked" }), navEl(nav));
  }
  wrap.append(row, bar);
  return wrap;
}

// ---- feedback -----------------------------------------------------------------------------------------------

async function reload(conversationId) {
  state.conv = await api("GET", `/feedback/conversations/${conversationId}`);
  render();
  loadConversations();
}

async function copy(m) {
  try {
    await navigator.clipboard.writeText(m.content);
  } catch (_) { // no clipboard permission (e.g. a plain-http remote origin): the old way
    const area = Object.assign(document.createElement("textarea"), { value: m.content });
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  setStatus("copied");
  await api("POST", `/feedback/messages/${m.id}/signal`, { kind: "copied" }).catch((e) => showError(e));
}

async function rate(m, value) {
  try {
    await api("POST", `/feedback/messages/${m.id}/rating`, { value });
    await reload(state.conv.id);
  } catch (e) { showError(e); }
}

async function saveAnswerEdit(m, content) {
  try {
    await api("POST", `/feedback/messages/${m.id}/edit`, { content });
    await reload(state.conv.id);
  } catch (e) { showError(e); }
}

async function submitRanking(group, picks) {
  try {
    await api("POST", "/feedback/rankings", { message_ids: group.map((m) => m.id), ranking: picks });
    await reload(state.conv.id);
    setStatus("ranking saved");
  } catch (e) { showError(e); }
}

// ---- asking the model ---------------------------------------------------------------------------------------

function requestBody(messages, n) {
  const body = { model: state.config.model, messages, stream: true, n, truncate: true };
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  return body;
}

// Streams one chat completion; onDelta(choiceIndex, text) per piece; onId(completion id) once known.
// Resolves to {index: finish_reason}.
async function streamChat(messages, n, onDelta, signal, onId) {
  const res = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages, n)), signal,
  });
  if (res.status === 401) { await askKey(); return streamChat(messages, n, onDelta, signal, onId); }
  if (!res.ok) throw new Error(await errorMessage(res));
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  const finished = {};
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return finished;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return finished;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.id) onId(chunk.id);
        for (const c of chunk.choices) {
          if (c.delta && c.delta.content) onDelta(c.index, c.delta.content);
          if (c.finish_reason) finished[c.index] = c.finish_reason;
        }
      }
    }
  }
}

function pendingAnswers(k) {
  const box = $("messages");
  const bodies = [];
  if (k === 1) {
    const el = document.createElement("div");
    el.className = "msg role-assistant streaming pending";
    el.innerHTML = '<div class="who">assistant</div><div class="body"></div>';
    box.append(el);
    bodies.push(el.querySelector(".body"));
  } else {
    const row = document.createElement("div");
    row.className = "compare-row streaming pending";
    row.style.setProperty("--k", k);
    for (let i = 0; i < k; i++) {
      const col = document.createElement("div");
      col.className = "compare-col";
      col.innerHTML = '<div class="rank"></div><div class="body"></div>';
      row.append(col);
      bodies.push(col.querySelector(".body"));
    }
    box.append(row);
  }
  for (const b of bodies) b.dataset.chunks = "0";
  return bodies;
}

// Answers the conversation ending at `question` (a stored user message) and stores the answer(s).
async function answer(question, history) {
  const k = $("compare-toggle").checked ? state.config.compare_k : 1;
  const bodies = pendingAnswers(k);
  const texts = new Array(k).fill("");
  state.busy = true;
  state.abort = new AbortController();
  updateComposer();
  setStatus("");
  let finished = {};
  let completionId = null;
  try {
    finished = await streamChat(history.map((m) => ({ role: m.role, content: m.content })), k, (i, text) => {
      texts[i] += text;
      bodies[i].textContent = texts[i];
      bodies[i].dataset.chunks = String(Number(bodies[i].dataset.chunks) + 1);
      $("messages").scrollTop = $("messages").scrollHeight;
    }, state.abort.signal, (id) => { completionId = id; });
  } catch (e) {
    if (e.name !== "AbortError") showError(e);
  }
  state.busy = false;
  state.abort = null;
  const group = k > 1 ? crypto.getRandomValues(new Uint32Array(4)).join("").slice(0, 32) : null;
  try {
    // the answers are stored by reference: the server recorded what it sent, and fills in text and model
    if (completionId) {
      for (let i = 0; i < k; i++) {
        await api("POST", "/feedback/messages", {
          conversation_id: state.conv.id, role: "assistant", parent_id: question.id, completion_id: completionId,
          choice_index: i, compare_group: group, compare_index: group ? i : null,
        });
      }
    }
    delete state.selected[question.id];
    await reload(state.conv.id);
  } catch (e) { showError(e); render(); }
}

async function send(text) {
  if (!text.trim() || state.busy || state.pendingGroup) return;
  try {
    if (!state.conv) {
      const conv = await api("POST", "/feedback/conversations", {});
      state.conv = { ...conv, messages: [], rankings: [] };
      state.selected = {};
    }
    const parent = state.path[state.path.length - 1] || null;
    const question = await api("POST", "/feedback/messages", {
      conversation_id: state.conv.id, role: "user", content: text, parent_id: parent ? parent.id : null,
    });
    $("input").value = "";
    state.conv.messages.push(question);
    delete state.selected[parent ? parent.id : "root"];
    render();
    await answer(question, state.path);
  } catch (e) { showError(e); }
}

async function regenerate(m) {
  if (state.busy) return;
  const at = state.path.findIndex((p) => p.id === m.id);
  const question = state.path[at - 1];
  state.path = state.path.slice(0, at);
  removeFromView(m);
  await answer(question, state.path);
}

// Shows the conversation up to (not including) message m, so the new answer streams in its place.
function removeFromView(m) {
  const el = document.querySelector(`[data-id="${m.id}"]`);
  if (el) (el.closest(".compare-row") ? el.closest(".compare-row").parentElement : el).remove();
}

async function resubmit(m, content) {
  if (state.busy || !content.trim()) return;
  try {
    const question = await api("POST", "/feedback/messages", {
      conversation_id: state.conv.id, role: "user", content, parent_id: m.parent_id,
    });
    state.conv.messages.push(question);
    delete state.selected[m.parent_id || "root"];
    render();
    await answer(question, state.path);
  } catch (e) { showError(e); }
}

// ---- conversations list -------------------------------------------------------------------------------------

async function loadConversations() {
  const list = $("conversations");
  let data;
  try { data = (await api("GET", "/feedback/conversations")).data; } catch (e) { showError(e); return; }
  list.textContent = "";
  for (const c of data) {
    const li = document.createElement("li");
    li.dataset.id = c.id;
    if (state.conv && state.conv.id === c.id) li.className = "current";
    const title = Object.assign(document.createElement("span"), { className: "title", textContent: c.title || "(untitled)" });
    title.addEventListener("click", () => { if (!state.busy) { state.selected = {}; reload(c.id); } });
    const del = button("×", "delete this conversation", async () => {
      if (!confirm("Delete this conversation?")) return;
      await api("DELETE", `/feedback/conversations/${c.id}`).catch((e) => showError(e));
      if (state.conv && state.conv.id === c.id) { state.conv = null; render(); }
      loadConversations();
    }, "delete");
    li.append(title, del);
    list.append(li);
  }
}

async function init() {
  state.config = await (await fetch("/ui/config")).json();
  $("compare-k").textContent = state.config.compare_k;
  $("model-name").textContent = `model: ${state.config.model} · context ${state.config.context_length} tokens`;
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send($("input").value); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send($("input").value); }
  });
  $("stop").addEventListener("click", () => { if (state.abort) state.abort.abort(); });
  $("new-chat").addEventListener("click", () => {
    if (state.busy) return;
    state.conv = null;
    state.selected = {};
    render();
    loadConversations();
  });
  render();
  loadConversations();
}

init().catch((e) => setStatus(`cannot reach the server: ${e.message}`, true));
