// The operators' dashboard: plain JavaScript over the JSON admin API (/v1/admin).
// The admin key is asked once and kept in sessionStorage (this tab only). Every value
// from the API is put on the page as text (never as HTML).
"use strict";

const KEY = "rcg-admin-key";
const REFRESH_MS = 2000;
const SERIES = [
  ["created", "#4c78a8"],
  ["completed", "#54a24b"],
  ["failed", "#e45756"],
  ["delivery_failed", "#f58518"],
];
const $ = (selector) => document.querySelector(selector);

let refresh = null; // the timer re-reading the view shown
let tenants = []; // tenant ids, from the overview
let nextCursor = null;

// --- the API ---------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const answer = await fetch(path, {
    ...options,
    headers: {
      Authorization: `Bearer ${sessionStorage.getItem(KEY) || ""}`,
      "Content-Type": "application/json",
    },
  });
  if (answer.status === 401) {
    throw new Unauthorized();
  }
  const body = await answer.json();
  if (!answer.ok) {
    throw new Error(body.detail || `HTTP ${answer.status}`);
  }
  return body;
}

// --- small helpers ------------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function when(iso, withMs = false) {
  if (!iso) return "";
  const text = iso.replace("T", " ").replace(/\+00:00$/, "Z");
  return withMs ? text.replace(/(\.\d{3})\d*Z$/, "$1Z") : text.replace(/\.\d+Z$/, "Z");
}

function badge(status) {
  return el("span", { class: `badge ${status}`, text: status });
}

function jobLink(id) {
  return el("a", { href: `#job/${id}`, text: id });
}

function rows(table, items, cells) {
  const body = $(`${table} tbody`);
  body.replaceChildren(...items.map((item) => el("tr", {}, ...cells(item).map((c) => el("td", {}, c)))));
}

function show(section) {
  for (const node of document.querySelectorAll("main > section")) node.hidden = node.id !== section;
  $("#nav").hidden = section === "login";
}

function every(ms, read) {
  clearInterval(refresh);
  refresh = setInterval(() => read().catch(failed), ms);
  return read();
}

function failed(error) {
  if (error instanceof Unauthorized) {
    signOut("That key is not an admin key, or it is no longer one.");
  } else {
    console.warn(error);
  }
}

// --- sign in ------------------------------------------------------------------------------

function signOut(message = "") {
  clearInterval(refresh);
  sessionStorage.removeItem(KEY);
  $("#login-error").textContent = message;
  show("login");
}

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("#login-key").value.trim());
  $("#login-key").value = "";
  try {
    await api("/v1/admin/overview");
  } catch (error) {
    signOut(error instanceof Unauthorized ? "That key is not an admin key." : error.message);
    return;
  }
  location.hash = location.hash && location.hash !== "#login" ? location.hash : "#overview";
  route();
}

// --- overview -----------------------------------------------------------------------------

async function readOverview() {
  const [overview, activity] = await Promise.all([
    api("/v1/admin/overview"),
    api(`/v1/admin/activity?minutes=${$("#chart-minutes").value}`),
  ]);
  tenants = overview.tenants.map((t) => t.tenant);
  const pause = overview.pause ? `${overview.pause.reason}, ${overview.pause.remaining_s} s left` : "none";
  const tiles = [
    ["backlog", overview.backlog],
    ["upstream slots", `${overview.upstream_slots.used} / ${overview.upstream_slots.limit}`],
    ["deliveries scheduled", overview.deliveries_scheduled],
    ["upstream pause", pause],
  ];
  $("#tiles").replaceChildren(
    ...tiles.map(([name, value]) => el("div", { class: "tile" }, el("b", { text: value }), el("span", { text: name }))),
  );
  rows("#tenants", overview.tenants, (t) => [
    t.tenant,
    t.jobs.pending,
    t.in_runcomfy,
    t.max_in_flight ? `${t.upstream_slots} / ${t.max_in_flight}` : t.upstream_slots,
    t.jobs.completed,
    t.jobs.failed,
    t.jobs.cancelled,
    t.failed_deliveries,
    t.charged_today_usd === null ? "–" : `$${t.charged_today_usd.toFixed(2)}`,
  ]);
  drawChart(activity.minutes);
}

function drawChart(minutes) {
  const width = 900, height = 220, left = 40, bottom = 24, top = 10;
  const most = Math.max(1, ...minutes.flatMap((m) => SERIES.map(([name]) => m[name])));
  const x = (i) => left + (i * (width - left - 10)) / Math.max(1, minutes.length - 1);
  const y = (v) => top + (height - top - bottom) * (1 - v / most);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  const add = (tag, attributes, text) => {
    const node = document.createElementNS(svg.namespaceURI, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
  };
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "jobs and webhooks per minute");
  for (const v of [0, most / 2, most]) {
    add("line", { x1: left, x2: width - 10, y1: y(v), y2: y(v), class: "grid" });
    add("text", { x: left - 6, y: y(v) + 4, class: "axis", "text-anchor": "end" }, Math.round(v));
  }
  const last = minutes.length - 1;
  for (const [i, anchor] of [[0, "start"], [Math.floor(last / 2), "middle"], [last, "end"]]) {
    if (minutes[i]) add("text", { x: x(i), y: height - 6, class: "axis", "text-anchor": anchor }, when(minutes[i].at).slice(11, 16));
  }
  for (const [name, color] of SERIES) {
    const points = minutes.map((m, i) => `${x(i).toFixed(1)},${y(m[name]).toFixed(1)}`).join(" ");
    add("polyline", { points, fill: "none", stroke: color, "stroke-width": 2 });
  }
  const legend = el("div", { class: "legend" }, ...SERIES.map(([name]) => el("span", {}, el("i", { class: name }), name.replace("_", " "))));
  $("#chart").replaceChildren(svg, legend);
}

// --- jobs ---------------------------------------------------------------------------------

function fillTenants(select) {
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "", text: "all" }), ...tenants.map((t) => el("option", { value: t, text: t })));
  select.value = chosen;
}

async function readJobs(append = false) {
  const query = new URLSearchParams();
  for (const [name, input] of [["tenant", "#filter-tenant"], ["status", "#filter-status"], ["q", "#filter-q"]]) {
    const value = $(input).value.trim();
    if (value) query.set(name, value);
  }
  if (append && nextCursor) query.set("cursor", nextCursor);
  const page = await api(`/v1/admin/jobs?${query}`);
  const shown = append ? [...$("#job-table tbody").children] : [];
  nextCursor = page.next_cursor;
  rows("#job-table", page.items, ({ tenant, job }) => [
    jobLink(job.id),
    tenant,
    badge(job.status),
    when(job.created_at),
    when(job.finished_at),
    job.webhook ? `${job.webhook.state} (${job.webhook.attempts})` : "–",
  ]);
  $("#job-table tbody").prepend(...shown);
  $("#jobs-empty").hidden = page.items.length + shown.length > 0;
  $("#jobs-more").hidden = !nextCursor;
}

// --- one job ------------------------------------------------------------------------------

async function readJob(id) {
  const detail = await api(`/v1/admin/jobs/${encodeURIComponent(id)}`);
  const job = detail.job;
  $("#job-title").replaceChildren(`${job.id} `, badge(job.status));
  const steps = [
    ["created", job.created_at],
    ["sent to RunComfy", job.submitted_at],
    ["cancel requested", detail.cancel_requested_at],
    ["started", job.started_at],
    [job.status, job.finished_at],
  ].filter(([, at]) => at);
  $("#timeline").replaceChildren(
    ...steps.map(([name, at]) => el("li", {}, el("b", { text: name }), " ", when(at, true))),
  );
  const facts = [
    ["tenant", detail.tenant],
    ["key", detail.key_id],
    ["RunComfy request", job.upstream ? job.upstream.request_id : "–"],
    ["deadline", when(detail.deadline_at)],
    ["error", job.error ? `${job.error.code}: ${job.error.message}` : "–"],
    ["output", job.output ? JSON.stringify(job.output) : "–"],
    ["webhook", job.webhook ? `${job.webhook.url} · ${job.webhook.state}, ${job.webhook.attempts} attempt(s)` : "none"],
    ["webhook-id", detail.webhook_id || "–"],
    ["cost", job.cost.estimate_usd === null ? "price unknown" : `$${job.cost.estimate_usd} (charged ${job.cost.charged_usd ?? "–"})`],
  ];
  $("#job-facts").replaceChildren(...facts.flatMap(([name, value]) => [el("dt", { text: name }), el("dd", { text: value })]));
  rows("#submits", detail.submits, (s) => [when(s.at), s.outcome, s.request_id || "", s.detail || ""]);
  rows("#attempts", detail.attempts, (a) => [
    a.attempt,
    when(a.at),
    a.status_code ?? "–",
    `${a.latency_ms} ms`,
    a.error || "",
    when(a.next_attempt_at),
    el("code", { text: a.response_excerpt.slice(0, 120) }),
  ]);
  const final = ["completed", "failed", "cancelled"].includes(job.status);
  $("#job-cancel").disabled = !["pending", "in_queue"].includes(job.status);
  $("#job-resend").disabled = !(final && job.webhook);
}

async function act(path, done) {
  const id = location.hash.slice("#job/".length);
  try {
    await api(`/v1/admin/jobs/${encodeURIComponent(id)}/${path}`, { method: "POST" });
    $("#job-message").textContent = done;
  } catch (error) {
    if (error instanceof Unauthorized) return failed(error);
    $("#job-message").textContent = error.message;
  }
  await readJob(id).catch(failed);
}

// --- failed deliveries and recovery -------------------------------------------------------

async function readFailed() {
  fillTenants($("#recover-tenant"));
  const page = await api("/v1/admin/deliveries/failed?limit=100");
  rows("#failed-table", page.items, ({ tenant, job }) => [
    jobLink(job.id),
    tenant,
    badge(job.status),
    when(job.finished_at),
    job.webhook.attempts,
  ]);
  $("#failed-empty").hidden = page.items.length > 0;
}

async function recover(event) {
  event.preventDefault();
  const body = { since: `${$("#recover-since").value}:00Z` };
  if ($("#recover-until").value) body.until = `${$("#recover-until").value}:00Z`;
  if ($("#recover-tenant").value) body.tenant = $("#recover-tenant").value;
  try {
    const answer = await api("/v1/admin/deliveries/recover", { method: "POST", body: JSON.stringify(body) });
    $("#recover-result").textContent = `Recovering ${answer.recovering} deliveries.`;
  } catch (error) {
    if (error instanceof Unauthorized) return failed(error);
    $("#recover-result").textContent = error.message;
  }
  await readFailed().catch(failed);
}

// --- routes -------------------------------------------------------------------------------

async function route() {
  if (!sessionStorage.getItem(KEY)) {
    signOut();
    return;
  }
  const [view, id] = location.hash.slice(1).split("/");
  try {
    if (!tenants.length) await readOverview();
    if (view === "jobs") {
      show("jobs");
      fillTenants($("#filter-tenant"));
      await every(REFRESH_MS, () => readJobs());
    } else if (view === "job" && id) {
      show("job");
      $("#job-message").textContent = "";
      await every(REFRESH_MS, () => readJob(decodeURIComponent(id)));
    } else if (view === "deliveries") {
      show("deliveries");
      if (!$("#recover-since").value) {
        $("#recover-since").value = new Date(Date.now() - 86400000).toISOString().slice(0, 16);
      }
      await every(REFRESH_MS * 2, readFailed);
    } else {
      show("overview");
      await every(REFRESH_MS * 2, readOverview);
    }
  } catch (error) {
    failed(error);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", signIn);
  $("#sign-out").addEventListener("click", () => signOut());
  $("#job-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    readJobs().catch(failed);
  });
  $("#jobs-more").addEventListener("click", () => readJobs(true).catch(failed));
  $("#job-cancel").addEventListener("click", () => act("cancel", "Cancel asked."));
  $("#job-resend").addEventListener("click", () => act("deliveries", "Webhook queued again."));
  $("#recover-form").addEventListener("submit", recover);
  $("#chart-minutes").addEventListener("change", () => readOverview().catch(failed));
  window.addEventListener("hashchange", route);
  route();
});
