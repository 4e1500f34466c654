// The Pigeon web client: plain ES module on the bundled SDK (pigeon-sdk.js, built from clients/js).
import { Api, Device, IndexedDBStore, PigeonError, registerWebPush, requestCode, verify } from "./pigeon-sdk.js";

const SESSION_KEY = "pigeon.session";
const LAST_CHAT_KEY = "pigeon.lastChat";
const PAGE = 30;
const $ = (id) => document.getElementById(id);

const state = {
  profile: null,
  api: null,
  device: null,
  store: new IndexedDBStore(),
  me: null,
  chats: new Map(), // chat id -> {info, last, unread, myRead, delivered, read, receipts}
  users: new Map(), // user id -> Promise<{user_id, phone, name}>
  open: null, // the open chat id
  rendered: new Map(), // seq -> element, for the open chat
  nextBefore: null,
  loadingOlder: false,
  typingTimer: null,
  lastTypingSent: 0,
  watchTimer: null,
  receiptsTimer: null,
  presence: null,
  swRegistration: null,
};

// -- messages to the user ------------------------------------------------------------------------
let errorTimer = null;
function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => { box.hidden = true; }, 8000);
}
function clearError() {
  $("error").hidden = true;
}
function explain(exc, what) {
  if (exc instanceof PigeonError) {
    if (exc.code === "unavailable" || exc.code === "not_connected" || exc.code === "timeout") {
      return `${what}: the server cannot be reached right now (${exc.message}). Try again in a moment.`;
    }
    return `${what}: ${exc.message}`;
  }
  return `${what}: ${exc && exc.message ? exc.message : String(exc)}`;
}
async function guarded(what, fn) {
  try {
    clearError();
    return await fn();
  } catch (exc) {
    console.error(exc);
    showError(explain(exc, what));
    return undefined;
  }
}

// -- people ----------------------------------------------------------------------------------------
function userCard(userId) {
  if (!state.users.has(userId)) {
    const p = state.api.user(userId).catch(() => ({ user_id: userId, phone: userId, name: null }));
    state.users.set(userId, p);
  }
  return state.users.get(userId);
}
async function nameOf(userId) {
  if (userId === state.profile.userId) return "You";
  const u = await userCard(userId);
  return u.name ? `${u.name} (${u.phone})` : u.phone;
}
function checkPhone(raw) {
  const phone = raw.replace(/[\s()-]/g, "");
  if (!/^\+[1-9]\d{6,14}$/.test(phone)) {
    throw new PigeonError("bad_request", `"${raw}" is not a phone number in international form, like +15550001111`);
  }
  return phone;
}
async function findByPhone(raw) {
  const phone = checkPhone(raw);
  try {
    return await state.api.findUser(phone);
  } catch (exc) {
    if (exc instanceof PigeonError && exc.code === "not_found") {
      throw new PigeonError("not_found", `nobody uses Pigeon with the phone number ${phone}`);
    }
    throw exc;
  }
}
function timeText(ms) {
  const d = new Date(ms);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : d.toLocaleString();
}

// -- login -----------------------------------------------------------------------------------------
function showLogin() {
  $("app").hidden = true;
  $("login").hidden = false;
  $("code-form").hidden = true;
  $("phone").focus();
}

$("phone-form").addEventListener("submit", (e) => {
  e.preventDefault();
  guarded("Could not send a code", async () => {
    const phone = checkPhone($("phone").value);
    const code = await requestCode(location.origin, phone);
    $("code-form").hidden = false;
    if (code) {
      $("code").value = code;
      $("code-hint").textContent = "Development server: the code was filled in for you.";
    } else {
      $("code-hint").textContent = `We sent a code to ${phone} by SMS.`;
    }
    $("code").focus();
  });
});

$("code-form").addEventListener("submit", (e) => {
  e.preventDefault();
  guarded("Could not log in", async () => {
    const phone = checkPhone($("phone").value);
    const code = $("code").value.trim();
    if (!/^\d{4,8}$/.test(code)) throw new PigeonError("bad_request", "the code is the digits we sent you");
    const profile = await verify(location.origin, phone, code, {
      deviceName: `${navigator.userAgent.includes("Chrome") ? "Chrome" : "Browser"} web`, platform: "web",
    });
    const name = $("name").value.trim();
    if (name) await new Api(profile).rename(name);
    localStorage.setItem(SESSION_KEY, JSON.stringify(profile));
    await start(profile);
  });
});

$("logout").addEventListener("click", () => {
  guarded("Could not log out", async () => {
    const { device, profile, api } = state;
    if (state.swRegistration) {
      const sub = await state.swRegistration.pushManager?.getSubscription?.();
      if (sub) await sub.unsubscribe();
    }
    await api.unlink(); // the token stops working: this browser is no longer a device of the account
    if (device) await device.close();
    await state.store.remove(profile.deviceId);
    forgetSession();
  });
});

function forgetSession() {
  localStorage.removeItem(SESSION_KEY);
  localStorage.removeItem(LAST_CHAT_KEY);
  Object.assign(state, { profile: null, api: null, device: null, me: null, open: null });
  state.chats.clear();
  state.users.clear();
  $("chats").replaceChildren();
  closeConversationView();
  showLogin();
}

// -- start -----------------------------------------------------------------------------------------
async function start(profile) {
  state.profile = profile;
  state.api = new Api(profile);
  try {
    state.me = await state.api.me();
  } catch (exc) {
    if (exc instanceof PigeonError && exc.status === 401) { // unlinked elsewhere, or expired
      forgetSession();
      showError("Your session has ended; please log in again.");
      return;
    }
    throw exc;
  }
  $("login").hidden = true;
  $("app").hidden = false;
  $("me-name").textContent = state.me.name ? `${state.me.name} · ${state.me.phone}` : state.me.phone;
  const device = new Device(profile, {
    store: state.store,
    onProfile: (p) => localStorage.setItem(SESSION_KEY, JSON.stringify(p)),
  });
  state.device = device;
  device.onStatus(showStatus);
  device.on(onEvent);
  await loadChats();
  try {
    await device.open(); // connects, syncs from the stored cursor: what came meanwhile arrives in order
  } catch (exc) {
    if (exc instanceof PigeonError && exc.code === "connect_refused") {
      forgetSession();
      showError("The server no longer accepts this device; please log in again.");
      return;
    }
    showError(explain(exc, "Not connected yet, retrying"));
    device.resume(); // keeps trying with backoff
  }
  const last = localStorage.getItem(LAST_CHAT_KEY);
  if (last && state.chats.has(last)) await openChat(last, document.body); // unless one has begun typing
  setupPush();
}

/** Resolves once the device is connected (requests over MQTT need it). */
function whenOnline() {
  const device = state.device;
  if (!device || device.status === "online") return Promise.resolve();
  return new Promise((resolve) => {
    const off = device.onStatus((s) => { if (s === "online") { off(); resolve(); } });
  });
}

function showStatus(s) {
  const text = { connecting: "connecting…", online: "online", offline: "offline — will catch up",
    refused: "the server refused this device", closed: "" }[s] ?? s;
  $("connection").textContent = text;
  $("connection").dataset.status = s;
  if (s === "refused") { // unlinked from another device, or the session expired
    forgetSession();
    showError("This browser is no longer logged in (it was unlinked, or the session expired). Please log in again.");
    return;
  }
  if (s === "online" && state.open) {
    watchPresence();
    markRead();
  }
}

window.addEventListener("offline", () => state.device?.suspend());
window.addEventListener("online", () => state.device?.resume());

// -- chat list --------------------------------------------------------------------------------------
async function loadChats() {
  const chats = await state.api.chats();
  await Promise.all(chats.map(async (info) => {
    const entry = ensureChat(info);
    const [page, receipts] = await Promise.all([
      info.last_seq > 0 ? state.api.history(info.chat, { limit: 1 }) : { messages: [] },
      state.api.receipts(info.chat),
    ]);
    entry.receipts = receipts;
    const mine = receipts.find((r) => r.user === state.profile.userId);
    entry.myRead = mine ? mine.read : 0;
    entry.unread = Math.max(0, info.last_seq - entry.myRead);
    if (page.messages[0]) entry.last = page.messages[0];
    applyReceiptTotals(entry);
  }));
  renderChatList();
}

// A chat as the server described it. Its members change only with a system message, so of two
// descriptions the one read at the higher last_seq is the newer: an answer that was on its way
// while the members changed (and arrives after the answer that saw the change) is not taken.
function ensureChat(info) {
  let entry = state.chats.get(info.chat);
  if (!entry) {
    entry = { info, infoSeq: info.last_seq, last: null, unread: 0, myRead: 0, delivered: 0, read: 0, receipts: [] };
    state.chats.set(info.chat, entry);
  } else if (info.last_seq >= entry.infoSeq) {
    entry.info = { ...info, last_seq: Math.max(info.last_seq, entry.info.last_seq) };
    entry.infoSeq = info.last_seq;
  }
  return entry;
}

function applyReceiptTotals(entry) {
  const others = entry.receipts.filter((r) => r.user !== state.profile.userId);
  if (others.length === 0) return;
  entry.delivered = Math.max(entry.delivered, Math.min(...others.map((r) => r.delivered)));
  entry.read = Math.max(entry.read, Math.min(...others.map((r) => r.read)));
}

async function chatTitle(entry) {
  const { info } = entry;
  if (info.kind === "group") return info.title || "Group";
  const peer = info.members.find((m) => m !== state.profile.userId) ?? state.profile.userId;
  return nameOf(peer);
}

async function lastText(m) {
  if (!m) return "";
  if (m.kind === "system") return systemLine(m);
  const who = m.from === state.profile.userId ? "You: " : "";
  const kind = m.media && m.media.mime.startsWith("image/") ? "Photo" : "File";
  const body = m.body || (m.media ? `${kind}: ${m.media.name || m.media.mime}` : "");
  return `${who}${body}`;
}

let listRender = Promise.resolve();
function renderChatList() {
  listRender = listRender.then(async () => {
    const entries = [...state.chats.values()].sort((a, b) => (b.last?.ts ?? 0) - (a.last?.ts ?? 0));
    const items = await Promise.all(entries.map(async (entry) => {
      const li = document.createElement("li");
      li.dataset.testid = "chat";
      li.dataset.chat = entry.info.chat;
      if (entry.info.chat === state.open) li.classList.add("active");
      const text = document.createElement("div");
      text.className = "text";
      const title = document.createElement("div");
      title.className = "title";
      title.textContent = await chatTitle(entry);
      const last = document.createElement("div");
      last.className = "last";
      last.dataset.testid = "last-message";
      last.textContent = await lastText(entry.last);
      text.append(title, last);
      li.append(text);
      if (entry.unread > 0 && entry.info.chat !== state.open) {
        const badge = document.createElement("span");
        badge.className = "unread";
        badge.dataset.testid = "unread";
        badge.textContent = String(entry.unread);
        li.append(badge);
      }
      li.addEventListener("click", () => guarded("Could not open the chat", () => openChat(entry.info.chat)));
      return li;
    }));
    $("chats").replaceChildren(...items);
  }).catch((exc) => console.error(exc));
  return listRender;
}

$("new-chat").addEventListener("submit", (e) => {
  e.preventDefault();
  const asked = document.activeElement;
  guarded("Could not open the chat", async () => {
    const peer = await findByPhone($("new-chat-phone").value);
    const info = await state.api.openDirect(peer);
    ensureChat(info);
    $("new-chat-phone").value = "";
    await openChat(info.chat, asked);
  });
});

$("new-group").addEventListener("submit", (e) => {
  e.preventDefault();
  const asked = document.activeElement;
  guarded("Could not create the group", async () => {
    const phones = $("group-members").value.split(/[,;]/).map((s) => s.trim()).filter(Boolean);
    const members = [];
    for (const p of phones) members.push(await findByPhone(p));
    const info = await state.api.createGroup($("group-title").value.trim(), members);
    ensureChat(info);
    $("group-title").value = "";
    $("group-members").value = "";
    $("new-group").closest("details").open = false;
    await openChat(info.chat, asked);
  });
});

$("add-member").addEventListener("submit", (e) => {
  e.preventDefault();
  guarded("Could not add the member", async () => {
    const user = await findByPhone($("add-member-phone").value);
    const info = await state.api.addMember(state.open, user);
    ensureChat(info);
    $("add-member-phone").value = "";
    await refreshReceipts();
    await showHeader();
  });
});

// -- conversation -----------------------------------------------------------------------------------
function closeConversationView() {
  clearInterval(state.watchTimer);
  clearInterval(state.receiptsTimer);
  $("open").hidden = true;
  $("empty").hidden = false;
}

/** Show a chat. `asked` is where the focus was when the person asked for it (a click on the list
 * calls this at once, so by default where it is now). */
async function openChat(chatId, asked = document.activeElement) {
  if (!state.chats.has(chatId)) ensureChat(await state.api.chat(chatId));
  const entry = state.chats.get(chatId);
  state.open = chatId;
  localStorage.setItem(LAST_CHAT_KEY, chatId);
  state.rendered = new Map();
  state.nextBefore = null;
  state.presence = null;
  $("message-list").replaceChildren();
  $("typing").textContent = "";
  $("empty").hidden = true;
  $("open").hidden = false;
  focusCompose(asked); // now, as the chat appears: not once it has loaded, when one may be typing elsewhere
  await showHeader();
  const page = await state.api.history(chatId, { limit: PAGE });
  if (state.open !== chatId) return;
  for (const m of page.messages) await renderMessage(m);
  state.nextBefore = page.next_before;
  $("older").hidden = state.nextBefore === null;
  if (page.messages[0]) entry.last = entry.last && entry.last.seq > page.messages[0].seq ? entry.last : page.messages[0];
  scrollToBottom();
  await refreshReceipts();
  clearInterval(state.watchTimer);
  clearInterval(state.receiptsTimer);
  state.watchTimer = setInterval(watchPresence, 240_000);
  if (entry.info.kind === "group") state.receiptsTimer = setInterval(refreshReceipts, 5000);
  watchPresence();
  markRead();
  renderChatList();
}

/** The message box gets the cursor when a chat opens, if the focus is still where it was when the
 * person asked for the chat, or nowhere: never from a field they have gone on to type in meanwhile. */
function focusCompose(asked) {
  const active = document.activeElement;
  if (!active || active === asked || active === document.body) $("compose").focus();
}

async function showHeader() {
  const entry = state.chats.get(state.open);
  $("chat-title").textContent = await chatTitle(entry);
  const isAdmin = entry.info.kind === "group" && (entry.info.admins ?? []).includes(state.profile.userId);
  $("add-member").hidden = !isAdmin;
  renderPresence();
}

function renderPresence() {
  const entry = state.chats.get(state.open);
  if (!entry) return;
  const el = $("presence");
  if (entry.info.kind === "group") {
    el.textContent = `${entry.info.members.length} members`;
    return;
  }
  const p = state.presence;
  if (!p) {
    el.textContent = "";
  } else if (p.online) {
    el.textContent = "online";
  } else {
    el.textContent = p.last_seen ? `last seen ${timeText(p.last_seen)}` : "offline";
  }
}

async function watchPresence() {
  const entry = state.chats.get(state.open);
  if (!entry || entry.info.kind !== "direct" || state.device?.status !== "online") return;
  const peer = entry.info.members.find((m) => m !== state.profile.userId);
  if (!peer) return;
  try {
    const now = await state.device.watch([peer], 300);
    if (now[0] && state.open === entry.info.chat) {
      state.presence = now[0];
      renderPresence();
    }
  } catch (exc) {
    console.warn("presence watch failed", exc);
  }
}

async function refreshReceipts() {
  const chatId = state.open;
  const entry = state.chats.get(chatId);
  if (!entry) return;
  try {
    entry.receipts = await state.api.receipts(chatId);
  } catch (exc) {
    console.warn("receipts failed", exc);
    return;
  }
  applyReceiptTotals(entry);
  if (state.open === chatId) updateTicks();
}

/** A group event in words: "You created the group", "Alice added Bob (+1555…)". */
async function systemLine(m) {
  const who = await nameOf(m.from);
  const whom = m.user ? await nameOf(m.user) : "";
  switch (m.event) {
    case "created": return `${who} created the group`;
    case "member_added": return `${who} added ${whom}`;
    case "member_left": return `${who} left`;
    case "member_removed": return `${who} removed ${whom}`;
    default: return `${who}: ${(m.event || "group event").replace(/_/g, " ")} ${whom}`.trim();
  }
}

function scrollToBottom() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

/** Put a message into the open conversation, in seq order, once. */
async function renderMessage(m) {
  if (state.rendered.has(m.seq)) {
    const el = state.rendered.get(m.seq);
    if (el.dataset.pending) fillMessage(el, m);
    return el;
  }
  const el = document.createElement("div");
  el.dataset.testid = "message";
  state.rendered.set(m.seq, el);
  await fillMessage(el, m);
  const list = $("message-list");
  const after = [...list.children].find((c) => Number(c.dataset.seq ?? c.dataset.order) > m.seq);
  list.insertBefore(el, after ?? null);
  return el;
}

async function fillMessage(el, m) {
  delete el.dataset.pending;
  const mine = m.from === state.profile.userId;
  el.className = `msg${mine ? " mine" : ""}${m.kind === "system" ? " system" : ""}`;
  el.dataset.order = String(m.seq);
  if (mine) el.dataset.seq = String(m.seq);
  const parts = [];
  const entry = state.chats.get(m.chat);
  if (m.kind === "system") {
    const span = document.createElement("span");
    span.className = "body";
    span.textContent = await systemLine(m);
    el.replaceChildren(span);
    return;
  }
  if (!mine && entry?.info.kind === "group") {
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = await nameOf(m.from);
    parts.push(who);
  }
  if (m.media) parts.push(mediaElement(m));
  if (m.body) {
    const body = document.createElement("div");
    body.className = "body";
    body.textContent = m.body;
    parts.push(body);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = timeText(m.ts);
  if (mine) {
    const tick = document.createElement("span");
    tick.className = "tick";
    meta.append(" ", tick);
  }
  parts.push(meta);
  el.replaceChildren(...parts);
  if (mine) setTick(el, m.seq);
}

function mediaElement(m) {
  const { media } = m;
  const box = document.createElement("div");
  box.className = "media";
  const label = `${media.name || "file"} (${formatSize(media.size)})`;
  if (media.mime.startsWith("image/")) {
    const img = document.createElement("img");
    img.alt = media.name || "image";
    img.dataset.testid = "image";
    whenOnline().then(() => state.device.mediaUrl(media.key, m.chat)).then((url) => { img.src = url; })
      .catch((exc) => { img.alt = `image unavailable: ${exc.message}`; });
    box.append(img);
  }
  const link = document.createElement("a");
  link.href = "#";
  link.dataset.testid = "file";
  link.textContent = `⬇ ${label}`;
  link.addEventListener("click", (e) => {
    e.preventDefault();
    guarded("Could not download the file", async () => {
      const data = await state.device.download(media.key, m.chat, media.sha256);
      const url = URL.createObjectURL(new Blob([data], { type: media.mime }));
      const a = document.createElement("a");
      a.href = url;
      a.download = media.name || "file";
      a.click();
      setTimeout(() => URL.revokeObjectURL(url), 10_000);
    });
  });
  box.append(link);
  return box;
}

function formatSize(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function statusOf(entry, seq) {
  if (seq <= entry.read) return "read";
  if (seq <= entry.delivered) return "delivered";
  return "sent";
}

function setTick(el, seq) {
  const entry = state.chats.get(state.open);
  if (!entry) return;
  const status = statusOf(entry, seq);
  el.dataset.status = status;
  const tick = el.querySelector(".tick");
  if (!tick) return;
  tick.dataset.kind = status;
  tick.textContent = status === "sent" ? "✓" : "✓✓";
  tick.title = status;
  if (entry.info.kind === "group") {
    const others = entry.receipts.filter((r) => r.user !== state.profile.userId);
    const readBy = others.filter((r) => r.read >= seq).length;
    tick.textContent += ` read by ${readBy} of ${others.length}`;
  }
}

function updateTicks() {
  for (const [seq, el] of state.rendered) if (el.dataset.seq) setTick(el, seq);
}

$("older").addEventListener("click", () => guarded("Could not load older messages", loadOlder));
$("messages").addEventListener("scroll", () => {
  if ($("messages").scrollTop < 40 && state.nextBefore !== null) guarded("Could not load older messages", loadOlder);
});

async function loadOlder() {
  if (state.loadingOlder || state.nextBefore === null) return;
  state.loadingOlder = true;
  const chatId = state.open;
  const box = $("messages");
  const fromBottom = box.scrollHeight - box.scrollTop;
  try {
    const page = await state.api.history(chatId, { before: state.nextBefore, limit: PAGE });
    if (state.open !== chatId) return;
    for (const m of page.messages) await renderMessage(m);
    state.nextBefore = page.next_before;
    $("older").hidden = state.nextBefore === null;
    box.scrollTop = box.scrollHeight - fromBottom;
  } finally {
    state.loadingOlder = false;
  }
}

function markRead() {
  const entry = state.chats.get(state.open);
  if (!entry || document.visibilityState === "hidden" || state.device?.status !== "online") return;
  const top = Math.max(0, ...[...state.rendered.keys()]);
  if (top > entry.myRead) {
    state.device.read(entry.info.chat, top).then(() => { entry.myRead = Math.max(entry.myRead, top); })
      .catch((exc) => console.warn("read not sent", exc));
  }
  if (entry.unread) {
    entry.unread = 0;
    renderChatList();
  }
}
document.addEventListener("visibilitychange", markRead);

// -- sending ----------------------------------------------------------------------------------------
$("compose-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("compose").value;
  if (!text.trim() || !state.open) return;
  $("compose").value = "";
  sendMessage({ body: text });
});

$("compose").addEventListener("input", () => {
  const now = Date.now();
  if (!state.open || now - state.lastTypingSent < 2500 || state.device?.status !== "online") return;
  state.lastTypingSent = now;
  state.device.typing(state.open).catch(() => {});
});

$("attach").addEventListener("change", () => {
  const file = $("attach").files[0];
  $("attach").value = "";
  if (!file || !state.open) return;
  sendMessage({ file });
});

async function sendMessage({ body, file }) {
  const chatId = state.open;
  const entry = state.chats.get(chatId);
  const pending = document.createElement("div");
  pending.className = "msg mine";
  pending.dataset.pending = "1";
  pending.dataset.order = String(Number.MAX_SAFE_INTEGER);
  pending.textContent = body ?? `${file.name} — uploading…`;
  $("message-list").append(pending);
  scrollToBottom();
  const ok = await guarded(file ? `Could not send ${file.name}` : "Could not send the message", async () => {
    let media;
    if (file) media = await state.device.upload(file, file.type || "application/octet-stream", file.name);
    const reply = await state.device.send({ chat: chatId, body, media, retries: 6 });
    const msg = { type: "msg", chat: chatId, seq: reply.seq, id: reply.id, from: state.profile.userId,
      device: state.profile.deviceId, ts: reply.ts, kind: media ? "media" : "text", body, media };
    pending.remove();
    if (state.open === chatId) {
      await renderMessage(msg);
      scrollToBottom();
    }
    noteLast(entry, msg);
    if (state.open === chatId) markRead(); // one's own message: everything above it has been seen
    return true;
  });
  if (!ok) pending.remove();
}

function noteLast(entry, m) {
  if (!entry.last || m.seq >= entry.last.seq) entry.last = m;
  entry.info.last_seq = Math.max(entry.info.last_seq, m.seq);
  renderChatList();
}

// -- live events ------------------------------------------------------------------------------------
function onEvent(ev) {
  handle(ev).catch((exc) => console.error("event handling failed", ev, exc));
}

async function handle(ev) {
  if (ev.type === "msg") {
    if (!state.chats.has(ev.chat)) ensureChat(await state.api.chat(ev.chat));
    const entry = state.chats.get(ev.chat);
    if (ev.kind === "system") { // members changed: show the chat as it is now
      ensureChat(await state.api.chat(ev.chat));
      if (state.open === ev.chat) await showHeader();
    }
    const fromOthers = ev.from !== state.profile.userId;
    if (state.open === ev.chat) {
      const box = $("messages");
      const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
      if (fromOthers || !state.rendered.has(ev.seq)) await renderMessage(ev);
      if (atBottom) scrollToBottom();
      if (fromOthers) {
        $("typing").textContent = "";
        markRead();
      }
    } else if (fromOthers && ev.seq > entry.myRead) {
      entry.unread += 1;
    }
    noteLast(entry, ev);
  } else if (ev.type === "receipt") {
    const entry = state.chats.get(ev.chat);
    if (!entry) return;
    if (ev.user === state.profile.userId) { // my own progress, from another device
      if (ev.kind === "read") entry.myRead = Math.max(entry.myRead, ev.up_to);
      return;
    }
    if (ev.kind === "read") entry.read = Math.max(entry.read, ev.up_to);
    entry.delivered = Math.max(entry.delivered, ev.up_to);
    if (state.open === ev.chat) {
      if (entry.info.kind === "group") await refreshReceipts();
      else updateTicks();
    }
  } else if (ev.type === "typing") {
    if (ev.chat !== state.open || ev.user === state.profile.userId) return;
    $("typing").textContent = `${await nameOf(ev.user)} is typing…`;
    clearTimeout(state.typingTimer);
    state.typingTimer = setTimeout(() => { $("typing").textContent = ""; }, 4000);
  } else if (ev.type === "presence") {
    const entry = state.chats.get(state.open);
    if (entry?.info.kind === "direct" && entry.info.members.includes(ev.user) && ev.user !== state.profile.userId) {
      state.presence = ev;
      renderPresence();
    }
  }
}

// -- notifications (Web Push, protocol section 7) ----------------------------------------------------
async function setupPush() {
  if (!("serviceWorker" in navigator) || !("PushManager" in window) || typeof Notification === "undefined") return;
  try {
    state.swRegistration = await navigator.serviceWorker.register("sw.js");
    if (await state.api.vapidKey() === null) return; // this server sends no Web Push
  } catch (exc) {
    console.warn("notifications unavailable", exc);
    return;
  }
  if (Notification.permission === "granted") {
    registerWebPush(state.api, state.swRegistration).catch((exc) => console.warn("push registration failed", exc));
    return;
  }
  if (Notification.permission === "denied") return;
  const button = $("notify");
  button.hidden = false;
  button.onclick = () => guarded("Could not turn on notifications", async () => {
    const outcome = await registerWebPush(state.api, state.swRegistration);
    button.hidden = outcome.registered || outcome.reason !== "denied";
    if (!outcome.registered && outcome.reason === "denied") showError("Notifications are blocked for this site.");
  });
}

// -- boot -------------------------------------------------------------------------------------------
async function resumeSession(profile, attempt = 0) {
  try {
    await start(profile);
  } catch (exc) {
    console.error(exc);
    const wait = Math.min(30, 2 ** attempt);
    showError(`${explain(exc, "Could not connect")} Retrying in ${wait} s.`);
    setTimeout(() => resumeSession(profile, attempt + 1), wait * 1000);
  }
}

const saved = localStorage.getItem(SESSION_KEY);
if (saved) {
  resumeSession(JSON.parse(saved));
} else {
  showLogin();
}
