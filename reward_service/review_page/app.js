// The review page: lists the running job's samples, posts ratings, draws the run's curves.
// Every piece of sample text is put into the page with textContent (never innerHTML), so a
// response containing markup shows as the characters it is. Requests go to the same app, with
// the HttpOnly cookie the ?token= sign-in set.
"use strict";

const $ = (id) => document.getElementById(id);
const picked = { a: null, b: null };
let timer = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fmt(v) {
  if (typeof v !== "number") return v === null || v === undefined ? "-" : String(v);
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 0.001 || v === 0 ? v.toFixed(3) : v.toExponential(1);
}

function status(msg, isError) {
  const s = $("status");
  s.textContent = msg;
  s.className = isError ? "error" : "";
}

function newId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(36) + "-" + Math.random().toString(36).slice(2);
}

async function getJSON(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

async function rate(rating, what) {
  rating.rating_id = newId();
  try {
    const r = await fetch("rate", { method: "POST", headers: { "Content-Type": "application/json" },
                                    body: JSON.stringify(rating) });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || `${r.status}`);
    status(`saved: ${what}`);
    showSummary(body);
    return true;
  } catch (e) {
    status(`not saved: ${e.message}`, true);
    return false;
  }
}

function showSummary(s) {
  $("summary").textContent = `ratings: ${s.pairs} A/B pairs, ${s.labels} labels, ${s.feedback} feedback records` +
    (s.reward_model_version === null || s.reward_model_version === undefined ? "" :
      `; reward model v${s.reward_model_version}`);
}

function sampleRow(s) {
  const tr = el("tr", null, "sample");
  tr.dataset.step = s.step;
  tr.dataset.promptId = s.prompt_id;
  tr.dataset.sampleIdx = s.sample_idx;
  tr.append(el("td", s.step));
  const p = el("td"); p.append(el("pre", s.prompt, "prompt")); tr.append(p);
  const r = el("td"); r.append(el("pre", s.response, "response")); tr.append(r);
  tr.append(el("td", fmt(s.reward) + (s.reward_valid === false ? " (invalid)" : ""), "reward"));
  const parts = Object.entries(s.reward_parts || {}).map(([k, v]) => `${k} ${fmt(v)}`);
  if (s.gold !== undefined && s.gold !== null) parts.push(`gold ${fmt(s.gold)}`);
  tr.append(el("td", parts.join(", "), "parts"));
  tr.append(el("td", `v${fmt(s.policy_version)} / RM v${fmt(s.reward_model_version ?? 0)}`));
  tr.append(el("td", s.worker_id));
  const act = el("td", null, "rate");
  const like = el("button", "like", "like");
  const dislike = el("button", "dislike", "dislike");
  const base = { prompt: s.prompt, response: s.response, step: s.step };
  like.onclick = async () => { if (await rate({ kind: "like", value: true, ...base }, "like")) like.classList.add("chosen"); };
  dislike.onclick = async () => { if (await rate({ kind: "like", value: false, ...base }, "dislike")) dislike.classList.add("chosen"); };
  act.append(like, dislike, el("br"));
  for (let v = 1; v <= 5; v++) {
    const b = el("button", v, "score"); b.dataset.value = v; b.title = `score ${v} of 5`;
    b.onclick = async () => { if (await rate({ kind: "score", value: v, ...base }, `score ${v}`)) b.classList.add("chosen"); };
    act.append(b);
  }
  const cmp = el("button", "compare", "compare");
  cmp.onclick = () => choose(s, tr);
  act.append(el("br"), cmp);
  tr.append(act);
  return tr;
}

function showSlot(which) {
  const slot = $(`slot-${which}`);
  slot.replaceChildren(el("b", which.toUpperCase()));
  const s = picked[which];
  if (s) {
    slot.append(el("span", ` step ${s.step}, sample ${s.sample_idx}`, "hint"), el("pre", s.prompt, "prompt"),
                el("pre", s.response, "response"));
  }
  const ready = picked.a && picked.b;
  $("pick-a").disabled = !ready;
  $("pick-b").disabled = !ready;
}

function choose(s, tr) {
  const which = !picked.a || (picked.a && picked.b) ? "a" : "b";
  if (which === "a") { picked.b = null; showSlot("b"); }
  if (which === "b" && s.prompt !== picked.a.prompt) {
    status("pick two samples of the same prompt", true);
    return;
  }
  picked[which] = s;
  document.querySelectorAll("tr.selected").forEach((r) => { if (which === "a") r.classList.remove("selected"); });
  tr.classList.add("selected");
  showSlot(which);
}

async function pick(better) {
  const [chosen, rejected] = better === "a" ? [picked.a, picked.b] : [picked.b, picked.a];
  const ok = await rate({ kind: "pick", prompt: chosen.prompt, chosen: chosen.response, rejected: rejected.response,
                          step: chosen.step }, `${better.toUpperCase()} is better`);
  if (ok) clearPick();
}

function clearPick() {
  picked.a = picked.b = null;
  document.querySelectorAll("tr.selected").forEach((r) => r.classList.remove("selected"));
  showSlot("a"); showSlot("b");
}

async function loadSamples() {
  const q = new URLSearchParams();
  if ($("f-step").value !== "") q.set("step", $("f-step").value);
  if ($("f-prompt").value !== "") q.set("prompt", $("f-prompt").value);
  q.set("limit", $("f-limit").value || "50");
  try {
    const data = await getJSON(`samples?${q}`);
    const body = $("samples").tBodies[0];
    body.replaceChildren(...data.samples.map(sampleRow));
    $("empty").hidden = data.samples.length > 0;
    $("samples").dataset.latestStep = data.latest_step ?? "";
  } catch (e) {
    status(`samples: ${e.message}`, true);
  }
}

const CHARTS = [
  ["reward (reward model + feedback)", ["reward_mean"]],
  ["gold score", ["gold_mean"]],
  ["KL to reference", ["kl"]],
  ["eval: reward, gold", ["eval_reward_mean", "eval_gold_mean"]],
];

function chart(title, keys, rows) {
  const W = 260, H = 110, P = 22;
  const box = el("div", null, "chart");
  box.append(el("h2", title));
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  const pts = keys.map((k) => rows.filter((r) => typeof r[k] === "number").map((r) => [r.step, r[k]]));
  const all = pts.flat();
  if (!all.length) {
    const t = document.createElementNS(ns, "text"); t.setAttribute("x", 8); t.setAttribute("y", H / 2);
    t.textContent = "no data yet"; svg.append(t); box.append(svg); return box;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const X = (x) => P + (x - x0) / (x1 - x0) * (W - P - 6), Y = (y) => H - P + 8 - (y - y0) / (y1 - y0) * (H - P - 6);
  let last = null;
  for (const r of rows) {  // reward model switches: dashed vertical lines
    const v = r.reward_model_version;
    if (typeof v === "number" && last !== null && v !== last) {
      const l = document.createElementNS(ns, "line");
      l.setAttribute("x1", X(r.step)); l.setAttribute("x2", X(r.step)); l.setAttribute("y1", 4); l.setAttribute("y2", H - 14);
      l.setAttribute("class", "switch");
      const t = document.createElementNS(ns, "title"); t.textContent = `reward model v${v} from step ${r.step}`;
      l.append(t); svg.append(l);
    }
    if (typeof v === "number") last = v;
  }
  pts.forEach((p, i) => {
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", p.map(([x, y]) => `${X(x)},${Y(y)}`).join(" "));
    line.setAttribute("class", `line s${i}`);
    svg.append(line);
  });
  for (const [txt, x, y] of [[fmt(y1), 2, 12], [fmt(y0), 2, H - P + 8], [`step ${x1}`, W - 50, H - 2]]) {
    const t = document.createElementNS(ns, "text"); t.setAttribute("x", x); t.setAttribute("y", y);
    t.textContent = txt; svg.append(t);
  }
  box.append(svg);
  return box;
}

async function loadCurves() {
  try {
    const data = await getJSON("curves");
    $("live").replaceChildren(...CHARTS.map(([t, k]) => chart(t, k, data.rows)));
  } catch (e) {
    status(`curves: ${e.message}`, true);
  }
}

async function refresh() {
  await Promise.all([loadSamples(), loadCurves(), getJSON("ratings").then(showSummary).catch(() => {})]);
  document.body.dataset.loaded = String(Date.now());
}

function schedule() {
  clearInterval(timer);
  if ($("f-auto").checked) timer = setInterval(refresh, 5000);
}

document.addEventListener("DOMContentLoaded", () => {
  $("filters").addEventListener("submit", (ev) => { ev.preventDefault(); refresh(); });
  $("f-auto").addEventListener("change", schedule);
  $("pick-a").onclick = () => pick("a");
  $("pick-b").onclick = () => pick("b");
  $("pick-clear").onclick = clearPick;
  refresh();
  schedule();
});
