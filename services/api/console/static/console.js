// The Switchboard operator console: a few screens over the public HTTP API.
//
// Everything a user or a model wrote is put on the page with textContent (never innerHTML), and
// the page's Content-Security-Policy allows no inline script, so hostile text stays text.
// The operator's key lives in sessionStorage (this tab only) and travels as `x-api-key`.
// Live updates come from GET /v1/events/stream, read with fetch() because EventSource cannot
// send a header.
"use strict";

const KEY = "switchboard.key";
const state = { me: null, view: null, conversationId: null, inbox: null, stream: null };
const $ = (id) => document.getElementById(id);

// Building DOM -----------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

function since(iso) {
  const seconds = Math.max(0, Math.floor((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${seconds % 60}s`;
  return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m`;
}

function timeLeft(iso) {
  const seconds = Math.floor((Date.parse(iso) - Date.now()) / 1000);
  if (seconds <= 0) return "deadline passed";
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${seconds % 60}s left`;
  return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m left`;
}

// Clocks that tick without re-fetching: every [data-since] / [data-until] element.
setInterval(() => {
  for (const node of document.querySelectorAll("[data-since]")) {
    node.textContent = `waiting ${since(node.dataset.since)}`;
  }
  for (const node of document.querySelectorAll("[data-until]")) {
    node.textContent = timeLeft(node.dataset.until);
  }
}, 1000);

// Messages ---------------------------------------------------------------------------------------

function notify(text, kind = "info") {
  const box = $("notice");
  box.textContent = text;
  box.dataset.kind = kind;
  box.hidden = !text;
}

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "http_error";
    this.details = error.details || {};
  }
}

// What a person should read for each failure, in the words of what they were doing.
function explain(error, doing) {
  if (!(error instanceof ApiError)) return `Could not ${doing}: the gateway did not answer. Check your connection.`;
  const d = error.details;
  if (error.status === 401) return "Your key is no longer valid (expired or revoked). Sign in again.";
  if (error.status === 403 && d.reason === "not_assignee") {
    return `You no longer hold this conversation: ${d.assignee_name || d.assignee} has it now.`;
  }
  if (error.status === 403) return `Your key may not ${doing} (${error.message}).`;
  if (error.code === "conversation_closed" || d.status === "closed") {
    return `Could not ${doing}: the conversation was closed meanwhile.`;
  }
  if (error.status === 409 && d.assignee) {
    return `Could not ${doing}: ${d.assignee_name || d.assignee} already claimed this conversation.`;
  }
  if (error.status === 409) return `Could not ${doing}: ${error.message}.`;
  if (error.status === 404) return `Could not ${doing}: it no longer exists.`;
  if (error.status === 429) return `Too many requests; try again in a moment.`;
  return `Could not ${doing}: ${error.message}.`;
}

// The API ----------------------------------------------------------------------------------------

async function api(method, path, body) {
  const key = sessionStorage.getItem(KEY);
  const headers = { "x-api-key": key || "" };
  if (body !== undefined) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (cause) {
    throw new TypeError(String(cause));
  }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401) signOut(explain(error));
    throw error;
  }
  return data;
}

async function attempt(doing, action) {
  try {
    return await action();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) notify(explain(error, doing), "error");
    return null;
  }
}

// Signing in -------------------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(KEY);
  state.me = null;
  stopStream();
  show("sign-in");
  $("nav").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  notify(message || "", message ? "error" : "info");
}

async function signIn(key) {
  sessionStorage.setItem(KEY, key);
  const me = await attempt("sign in", () => api("GET", "/v1/whoami"));
  if (!me) return;
  if (!me.scopes.includes("operator") && !me.scopes.includes("admin")) {
    signOut("This key is a client key; the console needs an operator or admin key.");
    return;
  }
  state.me = me;
  $("who").textContent = me.display_name || me.name;
  $("nav").hidden = false;
  $("sign-out").hidden = false;
  notify("");
  startStream();
  route();
}

// Routing ----------------------------------------------------------------------------------------

function show(view) {
  for (const id of ["sign-in", "inbox", "approvals", "conversation"]) $(id).hidden = id !== view;
  state.view = view;
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("current", link.getAttribute("href") === `#/${view}`);
  }
}

function route() {
  if (!state.me) return show("sign-in");
  const [, view, id] = (location.hash || "#/inbox").split("/");
  if (view === "conversation" && id) {
    state.conversationId = decodeURIComponent(id);
    resetConversation();
    show("conversation");
    loadConversation();
  } else if (view === "approvals") {
    state.conversationId = null;
    show("approvals");
    loadApprovals();
  } else {
    state.conversationId = null;
    show("inbox");
    loadInbox();
  }
}

// Inbox ------------------------------------------------------------------------------------------

function who(address, endUserId) {
  return address || endUserId;
}

function conversationLink(cid, label) {
  return el("a", { class: "open", href: `#/conversation/${encodeURIComponent(cid)}` }, label);
}

async function loadInbox() {
  const inbox = await attempt("load the inbox", () => api("GET", "/v1/inbox"));
  if (!inbox) return;
  state.inbox = inbox;
  // The badge counts what waits for someone: unclaimed handoffs (the list also shows claimed ones).
  const unclaimed = inbox.handoffs.filter((h) => h.handoff.status === "requested").length;
  $("inbox-count").textContent = unclaimed || "";
  $("inbox-count").title = unclaimed ? `${unclaimed} unclaimed` : "";
  $("approval-count").textContent = inbox.approvals.length || "";
  clear($("handoffs")).append(
    ...inbox.handoffs.map(({ handoff, user_address, last_message }) =>
      el(
        "li",
        { class: "item", "data-testid": "handoff", "data-conversation": handoff.conversation_id },
        conversationLink(handoff.conversation_id, who(user_address, handoff.end_user_id)),
        " ",
        el("span", { class: "tag channel" }, handoff.channel),
        el("span", { class: `tag ${handoff.status}` },
          handoff.status === "assigned" ? `with ${handoff.assignee_name || handoff.assignee}` : "unclaimed"),
        el("span", { class: "meta", "data-since": handoff.requested_at }, `waiting ${since(handoff.requested_at)}`),
        el("p", { class: "meta" }, `reason: ${handoff.reason}`),
        last_message ? el("p", { class: "last", "data-testid": "last-message" }, last_message) : null,
      ),
    ),
  );
  clear($("inbox-approvals")).append(
    ...inbox.approvals.map(({ approval, channel, end_user_id, user_address, last_message }) =>
      el(
        "li",
        { class: "item", "data-testid": "inbox-approval", "data-conversation": approval.conversation_id },
        conversationLink(approval.conversation_id, who(user_address, end_user_id)),
        " ",
        el("span", { class: "tag channel" }, channel),
        el("span", { class: "tag" }, `${approval.payload.tool}`),
        el("span", { class: "meta", "data-since": approval.created_at }, `waiting ${since(approval.created_at)}`),
        last_message ? el("p", { class: "last" }, last_message) : null,
        el("p", {}, el("a", { href: "#/approvals" }, "Decide under Approvals")),
      ),
    ),
  );
}

// Approvals --------------------------------------------------------------------------------------

async function loadApprovals() {
  // The inbox names who asked (their number or address); an approval alone knows only its
  // conversation.
  const [page, inbox] = await Promise.all([
    attempt("load approvals", () => api("GET", "/v1/approvals?status=pending&limit=100")),
    attempt("load the inbox", () => api("GET", "/v1/inbox")),
  ]);
  if (!page) return;
  const askers = new Map(
    (inbox ? inbox.approvals : []).map(({ approval, user_address, end_user_id }) =>
      [approval.id, who(user_address, end_user_id)]),
  );
  $("approval-count").textContent = page.items.length || "";
  clear($("approval-list")).append(
    ...page.items.map((approval) => approvalItem(approval, askers.get(approval.id) || approval.conversation_id)),
  );
}

function approvalItem(approval, asker) {
  const note = el("input", { type: "text", placeholder: "Note (optional)", "data-testid": "approval-note", maxlength: 2000 });
  const decide = (decision) => async (event) => {
    event.preventDefault();
    const done = await attempt(`${decision} this action`, () =>
      api("POST", `/v1/conversations/${encodeURIComponent(approval.conversation_id)}/approvals/${encodeURIComponent(approval.id)}/resolve`, {
        decision,
        note: note.value || null,
      }),
    );
    if (done) {
      notify(`${decision === "approve" ? "Approved" : "Rejected"}: ${approval.payload.tool}.`);
      loadApprovals();
    }
  };
  return el(
    "li",
    { class: "item", "data-testid": "approval", "data-approval": approval.id },
    el("strong", { "data-testid": "approval-tool" }, approval.payload.tool),
    " ",
    el("span", { class: "meta", "data-until": approval.timeout_at }, timeLeft(approval.timeout_at)),
    el("pre", { "data-testid": "approval-arguments" }, JSON.stringify(approval.payload.arguments || {}, null, 2)),
    el("p", { class: "meta" }, "from ", conversationLink(approval.conversation_id, asker),
      ` · needs ${approval.approver_role} · asked ${since(approval.created_at)} ago`),
    el(
      "form",
      { class: "approval-form" },
      note,
      el("button", { type: "submit", class: "primary", "data-testid": "approve", onclick: decide("approve") }, "Approve"),
      el("button", { type: "button", "data-testid": "reject", onclick: decide("reject") }, "Reject"),
    ),
  );
}

// A conversation ---------------------------------------------------------------------------------

// Nothing from the previous conversation may be acted on while the next one loads.
function resetConversation() {
  state.conversation = null;
  state.handoff = null;
  for (const id of ["conv-title", "conv-meta", "handoff-state"]) $(id).textContent = "";
  clear($("transcript"));
  $("claim").hidden = true;
  $("reassign").hidden = true;
  for (const id of ["hand-back", "close", "reply"]) $(id).disabled = true;
}

async function loadConversation() {
  const cid = state.conversationId;
  const path = `/v1/conversations/${encodeURIComponent(cid)}`;
  const conv = await attempt("open the conversation", () => api("GET", path));
  if (!conv || cid !== state.conversationId) return;
  const turns = [];
  let cursor = null;
  do {
    const query = cursor ? `?limit=100&cursor=${encodeURIComponent(cursor)}` : "?limit=100";
    const page = await attempt("load the transcript", () => api("GET", `${path}/turns${query}`));
    if (!page) return;
    turns.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor);
  const handoff = conv.handoff_id
    ? await attempt("load the handoff", () => api("GET", `/v1/handoffs/${encodeURIComponent(conv.handoff_id)}`))
    : null;
  if (cid !== state.conversationId) return;
  state.conversation = conv;
  state.handoff = handoff;
  $("conv-title").textContent = `${conv.channel.toUpperCase()} conversation with ${conv.user_address || conv.end_user_id}`;
  $("conv-meta").textContent = `${conv.id} · status ${conv.status} · agent ${conv.assigned_agent_id}`;
  const mine = handoff && handoff.assignee === state.me.id;
  $("handoff-state").textContent = !handoff
    ? conv.status === "waiting_for_human" ? "Waiting for a person." : "The agent has this conversation."
    : handoff.status === "requested"
      ? `Waiting for a person since ${new Date(handoff.requested_at).toLocaleTimeString()} (${handoff.reason}).`
      : mine ? "You have this conversation." : `${handoff.assignee_name || handoff.assignee} has this conversation.`;
  const open = conv.status !== "closed";
  const admin = state.me.scopes.includes("admin");
  // Claim stays offered to others while someone holds it: the refusal names the holder.
  $("claim").hidden = !(handoff && handoff.status !== "resolved" && !mine);
  $("reassign").hidden = !(handoff && handoff.status === "assigned" && !mine && admin);
  $("hand-back").disabled = !(open && conv.status === "waiting_for_human" && (!handoff || mine || handoff.status === "requested"));
  $("close").disabled = !open;
  $("reply").disabled = !open;
  $("reply-form").querySelector("button").disabled = !open;
  clear($("transcript")).append(...turns.map(turnItem));
}

function turnItem(turn) {
  const author = turn.author || { kind: "system" };
  const label = { end_user: "user", agent: "agent", operator: "operator", system: "system" }[author.kind] || author.kind;
  const name = author.kind === "operator" ? ` · ${author.name || author.id}` : "";
  return el(
    "li",
    { class: "turn", "data-author": author.kind, "data-testid": "turn", "data-seq": turn.seq },
    el("div", { class: "meta" }, `#${turn.seq} · ${label}${name} · ${turn.channel || "—"} · ${new Date(turn.created_at).toLocaleTimeString()}`),
    el("div", { class: "content", "data-testid": "turn-content" }, turn.content),
    ...(turn.tool_calls || []).map((call) =>
      el("details", { open: true, "data-testid": "tool-call" },
        el("summary", {}, `tool ${call.name} · decision ${call.decision}`),
        el("pre", {}, `arguments ${JSON.stringify(call.arguments || {})}`),
        call.result === null || call.result === undefined ? null : el("pre", {}, `result ${JSON.stringify(call.result)}`),
      ),
    ),
    (turn.evidence || []).length
      ? el("details", { "data-testid": "evidence" },
          el("summary", {}, `evidence (${turn.evidence.length})`),
          ...turn.evidence.map((e) => el("pre", {}, `${e.kb_id}/${e.chunk_id} · score ${e.score.toFixed(2)}\n${e.text}`)),
        )
      : null,
  );
}

async function claim(reassign) {
  const handoff = state.handoff;
  if (!handoff) return;
  const done = await attempt("claim this conversation", () =>
    api("POST", `/v1/handoffs/${encodeURIComponent(handoff.id)}/claim`, reassign ? { reassign: true } : {}),
  );
  if (done) notify("You have this conversation now.");
  loadConversation();
}

async function humanTurn(body, doing) {
  const cid = state.conversationId;
  const done = await attempt(doing, () => api("POST", `/v1/conversations/${encodeURIComponent(cid)}/human-turns`, body));
  loadConversation();
  return done;
}

// Live updates -----------------------------------------------------------------------------------

let refreshTimer = null;
function refreshSoon(event) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => {
    if (state.view === "inbox") loadInbox();
    else if (state.view === "approvals") loadApprovals();
    else if (state.view === "conversation" && (!event || !event.conversation_id || event.conversation_id === state.conversationId)) {
      loadConversation();
    }
  }, 150);
}

function stopStream() {
  if (state.stream) state.stream.abort();
  state.stream = null;
  $("live").dataset.state = "off";
  $("live").textContent = "offline";
}

async function startStream() {
  stopStream();
  const controller = new AbortController();
  state.stream = controller;
  while (!controller.signal.aborted && state.me) {
    try {
      const response = await fetch("/v1/events/stream", {
        headers: { "x-api-key": sessionStorage.getItem(KEY) || "", accept: "text/event-stream" },
        signal: controller.signal,
      });
      if (response.status === 401) {
        signOut("Your key is no longer valid (expired or revoked). Sign in again.");
        return;
      }
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      $("live").dataset.state = "live";
      $("live").textContent = "live";
      refreshSoon(null); // catch up on anything missed while disconnected
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0 || (end = buffer.indexOf("\r\n\r\n")) >= 0) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + (buffer.startsWith("\r\n", end) ? 4 : 2));
          onFrame(frame);
        }
      }
    } catch (error) {
      if (controller.signal.aborted) return;
    }
    $("live").dataset.state = "reconnecting";
    $("live").textContent = "reconnecting…";
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function onFrame(frame) {
  let type = "message";
  const data = [];
  for (const line of frame.split(/\r?\n/)) {
    if (line.startsWith("event:")) type = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (type === "ready" || !data.length) return;
  let event = null;
  try {
    event = JSON.parse(data.join("\n"));
  } catch (error) {
    event = null;
  }
  refreshSoon(event);
}

// Wiring -----------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("key").value.trim());
    $("key").value = "";
  });
  $("sign-out").addEventListener("click", () => signOut());
  $("claim").addEventListener("click", () => claim(false));
  $("reassign").addEventListener("click", () => claim(true));
  $("hand-back").addEventListener("click", async () => {
    if (await humanTurn({ content: "", hand_back: true }, "hand the conversation back")) {
      notify("Handed back to the agent.");
    }
  });
  $("close").addEventListener("click", async () => {
    const cid = state.conversationId;
    const done = await attempt("close the conversation", () =>
      api("POST", `/v1/conversations/${encodeURIComponent(cid)}/close`, { reason: "closed_by_operator" }),
    );
    if (done) notify("Conversation closed.");
    loadConversation();
  });
  $("reply-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = $("reply").value;
    if (!text.trim()) return;
    if (await humanTurn({ content: text }, "send your reply")) {
      $("reply").value = "";
      notify("");
    }
  });
  window.addEventListener("hashchange", route);
  const key = sessionStorage.getItem(KEY);
  if (key) signIn(key);
  else signOut();
});
