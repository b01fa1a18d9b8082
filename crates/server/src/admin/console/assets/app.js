// coexist console. Hand-written, no framework: reads and acts through the admin API
// (/v1/...) with the session cookie; every change carries the session's CSRF token.
// Text from the server goes into the page as text nodes only (never as HTML).
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const REFRESH_MS = 3000;
let timer = null;

// ---- helpers ----

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function $(id) { return document.getElementById(id); }
function show(id, on) { $(id).classList.toggle("hidden", !on); }
function num(n) { return el("td", { class: "num" }, n); }
function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

function banner(text) {
  const b = $("banner");
  clear(b);
  if (text) b.append(text);
  show("banner", !!text);
}

class ApiError extends Error {}

async function api(method, path, body, contentType) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (method !== "GET") opts.headers["X-CSRF-Token"] = CSRF;
  if (body !== undefined) {
    opts.body = body;
    opts.headers["Content-Type"] = contentType || "application/json";
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (_) { /* not JSON */ }
  if (r.status === 401) {
    throw new ApiError("your session has ended or was refused: log in again (reload the page)");
  }
  if (!r.ok) throw new ApiError((data && data.error) || ("HTTP " + r.status));
  return data;
}

function time(unix) {
  const d = new Date(unix * 1000);
  return d.toLocaleString(undefined, { hour12: false });
}

function hhmm(unix) {
  const d = new Date(unix * 1000);
  return String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
}

function age(s) {
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function kv(pairs) {
  const dl = el("dl", { class: "kv" });
  for (const [k, v] of pairs) {
    if (v === null || v === undefined || v === "") continue;
    dl.append(el("dt", {}, k), el("dd", {}, v));
  }
  return dl;
}

// ---- pages ----

const PAGES = ["overview", "batches", "address", "queue"];
// Bumped at each page change, so a refresh of a page left behind plans no next one.
let pageGeneration = 0;

function route() {
  const page = PAGES.includes(location.hash.slice(1)) ? location.hash.slice(1) : "overview";
  for (const p of PAGES) {
    show("page-" + p, p === page);
    $("nav-" + p).classList.toggle("current", p === page);
  }
  if (timer) clearTimeout(timer);
  timer = null;
  const live = { overview: loadOverview, queue: refreshQueue }[page];
  if (live) {
    // The next refresh is planned when this one is done: slow answers never pile up.
    const generation = ++pageGeneration;
    const tick = async () => {
      try { await live(); } finally {
        if (generation === pageGeneration) timer = setTimeout(tick, REFRESH_MS);
      }
    };
    tick();
  }
  if (page === "batches") loadTimeline();
}

// ---- overview ----

async function loadOverview() {
  let o;
  try { o = await api("GET", "/v1/overview"); } catch (e) { return banner("Overview: " + e.message); }
  banner("");
  $("ov-updated").textContent = "updated " + time(o.time);
  $("ov-counts").textContent =
    `${o.active} active · ${o.deferred} deferred · ${o.held} held`;
  const hopsOf = (r) => o.hops.filter((h) => h.route === r).map((h) => h.next_hop).join(", ");
  const shape = $("ov-shape").tBodies[0];
  clear(shape);
  for (const r of o.shape.routes) {
    shape.append(el("tr", { "data-route": r.route || "" },
      el("td", {}, r.route || "(no route)"), el("td", {}, hopsOf(r.route)),
      num(r.messages), num(r.recipients), r.buckets.map(num)));
  }
  if (!o.shape.routes.length) shape.append(el("tr", {}, el("td", { colspan: 10 }, "The queue is empty.")));
  $("ov-scanned").textContent = o.shape.scanned < o.shape.total
    ? `Counted over the ${o.shape.scanned} oldest of ${o.shape.total} messages.` : "";
  const hops = $("ov-hops").tBodies[0];
  clear(hops);
  for (const h of o.hops) {
    hops.append(el("tr", {},
      el("td", {}, h.route || "(resolved)"), el("td", {}, h.next_hop),
      el("td", { class: "state-" + h.state.replace(" ", "-") }, h.state), el("td", {}, h.detail)));
  }
  chart($("ov-chart"), o.minutes);
  const reasons = $("ov-reasons").tBodies[0];
  clear(reasons);
  for (const r of o.deferral_reasons) {
    reasons.append(el("tr", {}, el("td", {}, r.status), num(r.count), el("td", {}, r.sample)));
  }
  if (!o.deferral_reasons.length) reasons.append(el("tr", {}, el("td", { colspan: 3 }, "No deferrals in the last hour.")));
  loadSource();
}

// The LDAP source's current state (from /v1/ready): the reason while it fails, the last
// good round and the cursor.
async function loadSource() {
  let r;
  try { r = await api("GET", "/v1/ready"); } catch (_) { return; }
  const l = r.directory_ldap;
  show("ov-source", !!l);
  if (!l) return;
  const box = $("ov-source");
  clear(box);
  const cursor = l.usn != null ? `highestCommittedUSN ${l.usn}, invocationId ${l.invocation_id || "-"}`
    : (l.timestamp ? `modifyTimestamp ${l.timestamp}` : "-");
  if (l.error) {
    box.append(el("strong", { class: "state-down" }, "LDAP source failing"),
      ` since ${l.error_since || "?"}: ${l.error} (${l.failures} failed rounds; next try ${l.next_try || "?"}).`);
  } else if (l.healthy) {
    box.append(el("strong", {}, "LDAP source ok"), `: ${l.mailboxes} mailboxes.`);
  } else {
    box.append(el("strong", {}, "LDAP source"), ": no round on this node yet (in a fleet, one node runs them).");
  }
  box.append(` Last good round ${l.last_sync || "never"} (${l.mark || "-"}); last full read ${l.last_full_sync || "never"}; cursor ${cursor}.`);
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// Three lines (delivered, deferred, bounced per minute) over the last hour, with axes.
function chart(box, minutes) {
  const W = 760, H = 220, L = 50, R = 10, T = 10, B = 40;
  const series = ["delivered", "deferred", "bounced"];
  let max = 1;
  for (const m of minutes) for (const s of series) max = Math.max(max, m[s]);
  const step = Math.pow(10, Math.floor(Math.log10(max)));
  const top = Math.ceil(max / step) * step;
  const x = (i) => L + (i * (W - L - R)) / Math.max(1, minutes.length - 1);
  const y = (v) => T + (H - T - B) * (1 - v / top);
  const s = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": "recipients per minute over the last hour" });
  for (const v of [0, top / 2, top]) {
    s.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    s.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, String(Math.round(v * 10) / 10)));
  }
  s.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  s.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  for (let i = 0; i < minutes.length; i += 15) {
    s.append(svg("text", { x: x(i), y: H - B + 16, "text-anchor": "middle" }, hhmm(minutes[i].minute)));
  }
  if (minutes.length) {
    const last = minutes.length - 1;
    s.append(svg("text", { x: x(last), y: H - B + 16, "text-anchor": "end" }, hhmm(minutes[last].minute)));
  }
  s.append(svg("text", { x: (L + W) / 2, y: H - 6, "text-anchor": "middle" }, "time (minute started)"));
  s.append(svg("text", { x: 12, y: (T + H - B) / 2, "text-anchor": "middle",
    transform: `rotate(-90 12 ${(T + H - B) / 2})` }, "recipients / min"));
  for (const name of series) {
    const pts = minutes.map((m, i) => `${x(i)},${y(m[name])}`).join(" ");
    s.append(svg("polyline", { points: pts, fill: "none", "stroke-width": 2, class: name }));
  }
  clear(box);
  const total = (k) => minutes.reduce((a, m) => a + m[k], 0);
  box.append(s, el("p", { class: "legend", id: "ov-legend" },
    series.map((k) => el("span", { class: k }, `■ ${k} ${total(k)}`))));
}

// ---- batches ----

let preview = null;

async function loadTimeline() {
  let changes, fleet = null;
  try {
    changes = await api("GET", "/v1/directory/batches");
  } catch (e) { return banner("Change log: " + e.message); }
  try { fleet = await api("GET", "/v1/fleet"); } catch (_) { /* not in a fleet */ }
  $("fleet-summary").textContent = fleet
    ? `Fleet: log head ${fleet.head}; ${fleet.nodes.length} node(s).` : "";
  const sh = fleet && fleet.shadow;
  $("shadow-summary").textContent = sh
    ? `Shadow copies: ${sh.store_error ? "CANNOT BE STORED: " + sh.store_error : "stored"}; ` +
      `this node's lease: ${sh.lease_held ? "held" : "NOT HELD (delivering nothing)"}. ` +
      sh.nodes.map((n) => `${n.node}: backlog ${n.backlog}` +
        (n.taken_over ? `, ${n.taken_over}` : "") + (n.took ? `, ${n.took}` : "")).join(" · ")
    : "";
  const ol = $("timeline");
  clear(ol);
  for (const c of changes.slice().reverse()) {
    const li = el("li", { "data-id": c.id },
      el("strong", {}, `#${c.id} ${c.kind}`), ` ${time(Date.parse(c.time) / 1000)} · ${c.source} · ${c.count} mailbox(es)`,
      c.rolls_back ? ` · undoes #${c.rolls_back}` : "");
    if (fleet) {
      const have = fleet.nodes.filter((n) => n.applied >= c.id).map((n) => n.name);
      const not = fleet.nodes.filter((n) => n.applied < c.id).map((n) => n.name);
      li.append(el("div", { class: "note" }, `applied on: ${have.join(", ") || "none"}` +
        (not.length ? ` · not yet: ${not.join(", ")}` : "")));
    }
    if (c.kind === "apply") {
      li.append(" ", el("button", { class: "rollback", "data-id": c.id, onclick: () => confirmBatch(
        `Roll back change #${c.id} (${c.source}, ${c.count} mailbox(es))?`,
        () => api("POST", `/v1/directory/batches/${c.id}/rollback`)) }, "Roll back"));
    }
    ol.append(li);
  }
  if (!changes.length) ol.append(el("li", {}, "No changes yet."));
  if (focusChange !== null) {
    const li = ol.querySelector(`li[data-id="${focusChange}"]`);
    if (li) { li.classList.add("focus"); li.scrollIntoView({ block: "center" }); }
    focusChange = null;
  }
}

function renderReport(box, r, title) {
  clear(box);
  box.append(el("h3", {}, title), kv([
    ["rows", r.rows], ["changed", r.changed], ["already in that state", r.already],
    ["not found", r.not_found_count], ["changed since (left as they are)", r.changed_since || ""],
  ]));
  if (r.not_found.length) box.append(el("p", {}, "Not found: ", r.not_found.join(", ")));
  if (r.not_completed && r.not_completed.length) {
    box.append(el("p", {}, "Left as they are, by status:"), el("ul", {}, r.not_completed.map(
      (g) => el("li", {}, `${g.status}: ${g.count}` + (g.addresses.length ? ` (${g.addresses.join(", ")})` : "")))));
  }
  if (r.fleet) box.append(el("p", {}, `Applied on ${r.fleet.applied} of ${r.fleet.live} live node(s)` +
    (r.fleet.silent.length ? `; silent: ${r.fleet.silent.join(", ")}` : "")));
  if (r.traffic) {
    const t = r.traffic;
    box.append(el("p", { class: "traffic" }, `Traffic on ${t.node}: ${t.received} message(s) to these ` +
      `${t.addresses} address(es) in the last ${t.days} day(s) (${t.per_day.toFixed(1)} a day); ` +
      `${t.queued_now} queued for them now.`));
  }
  show(box.id, true);
}

function batchQuery(p, dry) {
  const q = new URLSearchParams({ source: p.name, format: p.format });
  if (p.state) q.set("state", p.state);
  if (dry) q.set("dry_run", "true");
  return "/v1/directory/batches?" + q;
}

async function previewBatch(ev) {
  ev.preventDefault();
  show("batch-result", false);
  show("batch-confirm", false);
  const f = $("batch-file").files[0];
  if (!f) return banner("Choose a file to preview.");
  preview = { name: f.name, format: $("batch-format").value, state: $("batch-state").value.trim(), body: await f.text() };
  try {
    const r = await api("POST", batchQuery(preview, true), preview.body, "text/csv");
    banner("");
    renderReport($("batch-diff"), r, `Preview of ${preview.name} (nothing applied yet)`);
    confirmBatch(`Apply ${preview.name}: ${r.changed} mailbox(es) change state?`,
      () => api("POST", batchQuery(preview, false), preview.body, "text/csv"));
  } catch (e) {
    clear($("batch-diff"));
    $("batch-diff").append(el("p", { class: "error" }, "Refused: " + e.message));
    show("batch-diff", true);
  }
}

let pendingBatch = null;
function confirmBatch(text, action) {
  pendingBatch = action;
  $("batch-confirm-text").textContent = text;
  show("batch-confirm", true);
}

async function doBatch() {
  const action = pendingBatch;
  pendingBatch = null;
  show("batch-confirm", false);
  if (!action) return;
  try {
    const r = await action();
    renderReport($("batch-result"), r, r.id ? `Done: change #${r.id}` : "Done: nothing changed");
    show("batch-diff", false);
  } catch (e) {
    clear($("batch-result"));
    $("batch-result").append(el("p", { class: "error" }, "Refused: " + e.message));
    show("batch-result", true);
  }
  loadTimeline();
}

// ---- address search ----

async function searchAddress(ev) {
  ev.preventDefault();
  const a = $("addr-input").value.trim();
  if (!a) return;
  const box = $("addr-explain");
  clear(box);
  show("addr-explain", true);
  try {
    const x = await api("GET", "/v1/directory/lookup?address=" + encodeURIComponent(a));
    box.append(kv([
      ["address", x.address], ["state", x.state || "not listed"], ["origin", x.origin],
      ["mailbox", x.mailbox], ["routing address", x.routing_address], ["RCPT", x.rcpt],
      ["route", x.route || "none (rejected)"], ["next hops", x.next_hops.join(", ") || x.mx],
      ["sent as", x.rewritten], ["TLS", x.tls && (x.tls + (x.tls_name ? ` (${x.tls_name})` : ""))],
      ["DSN route", x.dsn_route],
    ]));
  } catch (e) {
    box.append(el("p", { class: "error" }, e.message));
  }
  const body = $("addr-trace").tBodies[0];
  clear(body);
  try {
    const t = await api("GET", "/v1/trace?since=" + MONTH_S + "&address=" + encodeURIComponent(a));
    for (const e of t.entries) {
      const reply = e.reply ? [e.reply.code, e.reply.status, e.reply.text].filter((v) => v !== null).join(" ") : "";
      const qid = t.source === "log"
        ? el("a", { href: "#address", class: "qid", onclick: (ev) => { ev.preventDefault(); openTracked(e.queue_id); } }, e.queue_id)
        : e.queue_id;
      body.append(el("tr", {}, el("td", {}, time(e.time)), el("td", {}, qid),
        el("td", { class: "outcome-" + e.outcome }, e.outcome), el("td", {}, e.route || ""),
        el("td", {}, e.next_hop || ""), el("td", {}, e.origin), el("td", {}, reply)));
    }
    if (!t.entries.length) body.append(el("tr", {}, el("td", { colspan: 7 }, "No deliveries recorded for this address.")));
    if (t.truncated) body.append(el("tr", {}, el("td", { colspan: 7, class: "note" }, "Older events left out (more than one answer carries): use coexist trace with --since/--until.")));
  } catch (e) {
    body.append(el("tr", {}, el("td", { colspan: 7, class: "error" }, e.message)));
  }
}

// ---- message view (tracking log) ----

const MONTH_S = 30 * 86400;
// The change the Batches page shows first when it opens (from a message view's origin).
let focusChange = null;

// One line per event of a message on this node: received, routed (the origin of its
// state linked to the change log), each attempt with the remote reply in full, DSN,
// admin actions, takeover.
async function openTracked(qid) {
  const box = $("addr-message");
  clear(box);
  show("addr-message", true);
  let t;
  try {
    t = await api("GET", "/v1/trace?since=" + MONTH_S + "&queue_id=" + encodeURIComponent(qid));
  } catch (e) { return box.append(el("p", { class: "error" }, e.message)); }
  box.append(el("h3", {}, `Message ${qid} on ${t.node}`));
  const ol = el("ol", { class: "events" });
  for (const e of t.events) {
    const when = new Date(e.time_ms).toLocaleString(undefined, { hour12: false }) + "." + String(e.time_ms % 1000).padStart(3, "0");
    const li = el("li", {}, el("strong", {}, e.kind), " ", when);
    const parts = [];
    if (e.kind === "received") {
      parts.push(["from", e.sender || "<>"], ["to", e.recipients.join(", ")], ["size", e.size],
        ["client", e.client], ["TLS", e.tls], ["Message-ID", e.message_id]);
    } else {
      parts.push(["recipient", e.rcpt], ["state", e.state], ["route", e.route], ["next hop", e.next_hop],
        ["sent as", e.sent_as], ["DSN", e.related]);
    }
    li.append(kv(parts));
    if (e.origin) {
      // A batch or base: a link to that change in the change log (Batches page).
      const m = /^(batch|base) (\d+)$/.exec(e.origin) || /\(base (\d+)\)$/.exec(e.origin);
      const id = m && Number(m[m.length - 1]);
      li.append(el("div", {}, "origin: ", id
        ? el("a", { href: "#batches", class: "change-link", title: `change #${id} in the change log`,
            onclick: () => { focusChange = id; } }, e.origin)
        : e.origin));
    }
    if (e.reply) {
      li.append(el("pre", { class: "reply" }, [e.reply.code, e.reply.status].filter((v) => v !== null && v !== undefined).join(" ") + " " + e.reply.text));
    }
    ol.append(li);
  }
  if (!t.events.length) ol.append(el("li", {}, "Nothing in this node's tracking log for this queue id."));
  box.append(ol);
}

// ---- queue ----

let openId = null;
let pendingQueue = null;

function queueQuery() {
  const q = new URLSearchParams({ limit: "200" });
  const r = $("q-route").value.trim(), s = $("q-state").value, a = $("q-age").value, t = $("q-rcpt").value.trim();
  if (r) q.set("route", r);
  if (s) q.set("state", s);
  if (a) q.set("min_age", String(Math.max(0, Math.floor(Number(a) * 60))));
  if (t) q.set("rcpt", t);
  return "/v1/queue?" + q;
}

async function refreshQueue() {
  let list;
  try { list = await api("GET", queueQuery()); } catch (e) { return banner("Queue: " + e.message); }
  const body = $("queue-list").tBodies[0];
  clear(body);
  for (const m of list) {
    body.append(el("tr", { class: "clickable", "data-id": m.id, onclick: () => openMessage(m.id) },
      el("td", {}, m.id), el("td", {}, age(m.age_s)), el("td", { class: "phase" }, m.phase), el("td", {}, m.from || "<>"),
      el("td", {}, m.recipients.map((r) => r.address).join(", ")), num(m.attempts)));
  }
  if (!list.length) body.append(el("tr", {}, el("td", { colspan: 6 }, "No message matches.")));
  if (openId) openMessage(openId, true);
}

async function openMessage(id, quiet) {
  openId = id;
  const box = $("queue-detail");
  let m;
  try { m = await api("GET", "/v1/queue/" + encodeURIComponent(id)); } catch (e) {
    if (quiet) { openId = null; show("queue-detail", false); return; }
    clear(box); box.append(el("p", { class: "error" }, e.message)); show("queue-detail", true); return;
  }
  clear(box);
  box.append(el("h3", {}, "Message " + m.id),
    kv([["state", m.phase], ["from", m.from || "<>"], ["age", age(m.age_s)], ["size", m.size + " bytes"],
      ["attempts", m.attempts], ["next attempt in", m.next_attempt_in_s === null ? "" : age(m.next_attempt_in_s)]]),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "recipient"), el("th", {}, "status"), el("th", {}, "route"), el("th", {}, "last reply"))),
      el("tbody", {}, m.recipients.map((r) => el("tr", {}, el("td", {}, r.address), el("td", {}, r.status),
        el("td", {}, r.route || ""), el("td", {}, r.last_reply || ""))))),
    el("p", { id: "queue-phase", "data-phase": m.phase }, "State: " + m.phase),
    el("div", { class: "row" }, ["hold", "release", "flush", "delete"].map((a) =>
      el("button", { id: "q-" + a, class: a === "delete" ? "danger" : "", onclick: () => askQueue(m.id, a) }, a[0].toUpperCase() + a.slice(1)))));
  show("queue-detail", true);
}

function askQueue(id, action) {
  pendingQueue = { id, action };
  $("queue-confirm-text").textContent = `${action[0].toUpperCase() + action.slice(1)} message ${id}?`;
  show("queue-confirm", true);
}

async function doQueue() {
  const p = pendingQueue;
  pendingQueue = null;
  show("queue-confirm", false);
  if (!p) return;
  try {
    await api("POST", `/v1/queue/${encodeURIComponent(p.id)}/${p.action}`);
    banner("");
  } catch (e) {
    return banner(`${p.action} refused: ${e.message}`);
  }
  refreshQueue();
}

// ---- wiring ----

window.addEventListener("hashchange", route);
$("batch-form").addEventListener("submit", previewBatch);
$("batch-apply").addEventListener("click", doBatch);
$("batch-cancel").addEventListener("click", () => { pendingBatch = null; show("batch-confirm", false); });
$("addr-form").addEventListener("submit", searchAddress);
$("queue-form").addEventListener("submit", (ev) => { ev.preventDefault(); refreshQueue(); });
$("queue-confirm-yes").addEventListener("click", doQueue);
$("queue-confirm-no").addEventListener("click", () => { pendingQueue = null; show("queue-confirm", false); });
route();
