/* Community event pool dashboard: login, live event list, grid map, event detail, the case
 * inbox and case view (steps, deadlines, evidence, audit timeline), device board, handling
 * figures. Plain JS, no dependencies, nothing loaded from outside this server.
 * Data is always inserted with textContent / attributes, never as HTML.
 * The case rules live in the server's lifecycle table: which buttons show comes only from a
 * case's allowed_actions, and what each form asks for from its action_inputs. */
"use strict";

const API = "/api/v1";

const I18N = {
  zh: {
    title: "社区事件池", subtitle: "智慧社区预警 · 5.4", tab_events: "事件", tab_devices: "设备",
    live: "实时", offline: "离线", live_title: "实时推送连接", logout: "退出",
    login_title: "操作员登录", login_hint: "一人一帐号、一人一密码（GB/T 34300）",
    username: "用户名", password: "密码", login: "登录", login_failed: "登录失败",
    f_type: "类型", f_severity: "等级", f_status: "状态", f_community: "社区", all: "全部",
    no_events: "暂无事件", more: "更多",
    sev_critical: "特急", sev_high: "紧急", sev_medium: "较急", sev_low: "一般",
    st_registered: "已登记", st_verified: "已核实", st_dispatched: "已吹哨派单",
    st_handling: "处置中", st_closed: "已办结",
    overdue: "超时", open: "未办结", total: "事件",
    alerts_n: "预警", devices_n: "设备",
    k_status: "状态", k_severity: "等级", k_department: "责任部门", k_address: "事发位置",
    k_description: "问题描述", k_observed: "发现时间", k_registered: "登记时间",
    k_deadline: "处置时限", k_alerts: "预警数", k_devices: "设备", k_grid: "网格编码",
    k_recurrence: "复发自事件",
    h_alerts: "预警记录", h_timeline: "处置时间线", h_snapshots: "实时照片",
    c_device: "设备", c_time: "时间", c_conf: "置信度", c_outcome: "结果",
    accepted: "立案", merged: "合并", registered: "登记",
    devices_title: "设备状态", d_device: "设备", d_kind: "类型", d_state: "状态",
    d_last_seen: "最后通信", d_grid: "网格", d_health: "运行状况", d_alerts: "预警",
    d_rejected: "拒收", online: "在线", offline_state: "离线", unknown: "未知",
    camera: "摄像头", sensor: "传感器", hub: "网关",
    no_snapshot: "无照片", error: "出错了", dropped: "实时推送过慢，已重新连接",
    ago_s: "秒前", ago_m: "分钟前", ago_h: "小时前", ago_d: "天前",
    tab_handling: "处置考核", handling_title: "处置考核（龙港 8.6）", h_by: "分组",
    by_department: "责任部门", by_community: "社区", by_grid: "网格", by_type: "类型",
    h_name: "名称", h_registered: "登记", h_closed: "办结", h_rate: "处置率",
    h_on_time: "按期处置率", h_open: "未办结", h_overdue: "超时（督办）",
    h_median: "办结用时中位数", h_total: "合计", h_asof: "统计时间",
    h_note: "按期处置率 = 按期办结 / 应办结（已办结 + 超时未办结）。",
    tab_cases: "案件", box_to_accept: "待受理", box_to_handle: "待处置", box_to_review: "待验收",
    box_overdue: "超时", box_all: "全部", no_cases: "暂无案件", pick_case: "从左侧选择一个案件",
    cs_registered: "待核实", cs_assessing: "研判中", cs_community_handling: "社区自行处置",
    cs_whistled: "已吹哨待受理", cs_dept_handling: "部门处置中", cs_en_route: "待到场",
    cs_on_site: "现场处置中", cs_reviewing: "待验收", cs_rehandling: "退回重办",
    cs_closed: "已办结",
    act_verify: "核实", act_not_ours: "非本社区事件", act_self_handle: "自行处置", act_whistle: "吹哨",
    act_accept_off_site: "受理（非现场）", act_accept_on_site: "受理（现场）", act_arrive: "到场",
    act_handle: "处置反馈", act_accept_feedback: "验收办结", act_send_back: "退回重办",
    act_apply_extension: "申请延期", act_approve_extension: "批准延期", act_refuse_extension: "驳回延期",
    act_assign: "指派", act_reminder: "催办", act_overdue: "超期督办",
    act_escalate_street: "升级至街道", act_escalate_county: "升级至区县",
    k_case_state: "案件状态", k_version: "版本", k_lead: "牵头部门", k_co: "协办部门",
    k_assignee: "指派给", k_handled_by: "处置人", k_send_backs: "退回次数", k_extension: "延期申请", k_outcome: "结果",
    out_handled: "已处置", out_not_ours: "非本社区事件",
    h_deadlines: "环节时限", h_case_timeline: "案件时间线（审计记录）", h_actions: "可办理",
    c_stage: "环节", c_due: "时限", c_left: "剩余", left: "剩余", late_by: "超时",
    stopped: "已完成", on_time: "按期", late: "超期", extended: "已延期",
    f_note: "备注（可选）", f_reason: "理由", f_summary: "处置情况说明",
    f_photos: "处置前后照片（JPEG/PNG）", f_lead: "牵头部门", f_co: "协办部门",
    f_until: "新的时限", f_assignee: "指派给（帐号）", submit: "提交", cancel: "取消", required: "必填",
    need_evidence: "请填写处置说明或上传照片", need_reason: "请填写理由",
    need_lead: "请选择牵头部门", case_changed: "案件已被他人更新，已刷新",
    uploading: "正在上传照片…", round: "退回", evidence: "证据", no_case: "无案件信息",
    cm_title: "案件处置考核（龙港 8.6 · 江苏 6.3）", by_person: "人员",
    cm_first_time: "一次性处置率", cm_not_handled: "未有效处置",
    cm_note: "处置率 = 有效处置 / 登记；按期处置率 = 各环节均按期的办结 / 应办结；一次性处置率 = 未退回即办结 / 办结。",
    h_supervision: "督办", lv_community: "社区", lv_department: "部门", lv_street: "街道",
    lv_county: "区县", raised: "发起于",
    cm_unavailable: "案件考核暂不可用", cm_period: "统计期", cm_all_time: "全部",
    cm_1d: "近 1 天", cm_7d: "近 7 天", cm_30d: "近 30 天", cm_365d: "近一年",
  },
  en: {
    title: "Community event pool", subtitle: "Smart-community warnings · 5.4",
    tab_events: "Events", tab_devices: "Devices", live: "Live", offline: "Offline",
    live_title: "live stream connection", logout: "Log out",
    login_title: "Operator login", login_hint: "One person, one account, one password (GB/T 34300)",
    username: "Username", password: "Password", login: "Log in", login_failed: "Login failed",
    f_type: "Type", f_severity: "Severity", f_status: "Status", f_community: "Community",
    all: "All", no_events: "No events", more: "More",
    sev_critical: "Critical", sev_high: "High", sev_medium: "Medium", sev_low: "Low",
    st_registered: "Registered", st_verified: "Verified", st_dispatched: "Dispatched",
    st_handling: "Handling", st_closed: "Closed",
    overdue: "Overdue", open: "Open",
    total: "Events", alerts_n: "alerts", devices_n: "devices",
    k_status: "Status", k_severity: "Severity", k_department: "Department",
    k_address: "Location", k_description: "Description", k_observed: "Observed",
    k_registered: "Registered", k_deadline: "Deadline", k_alerts: "Alerts", k_devices: "Devices",
    k_grid: "Grid code", k_recurrence: "Recurrence of",
    h_alerts: "Alerts", h_timeline: "Timeline", h_snapshots: "Snapshots",
    c_device: "Device", c_time: "Time", c_conf: "Conf.", c_outcome: "Outcome",
    accepted: "opened", merged: "merged", registered: "registered",
    devices_title: "Device status", d_device: "Device", d_kind: "Kind", d_state: "State",
    d_last_seen: "Last seen", d_grid: "Grid", d_health: "Health", d_alerts: "Alerts",
    d_rejected: "Rejected", online: "online", offline_state: "offline", unknown: "unknown",
    camera: "camera", sensor: "sensor", hub: "hub",
    no_snapshot: "No snapshot", error: "Error", dropped: "Live stream too slow; reconnected",
    ago_s: "s ago", ago_m: "min ago", ago_h: "h ago", ago_d: "d ago",
    tab_handling: "Handling", handling_title: "Handling (Longgang 8.6)", h_by: "By",
    by_department: "Department", by_community: "Community", by_grid: "Grid", by_type: "Type",
    h_name: "Name", h_registered: "Registered", h_closed: "Closed", h_rate: "Handling rate",
    h_on_time: "On-time rate", h_open: "Open", h_overdue: "Overdue",
    h_median: "Median time to close", h_total: "All", h_asof: "as of",
    h_note: "On-time rate = closed on time / due (closed + open past the deadline).",
    tab_cases: "Cases", box_to_accept: "To accept", box_to_handle: "To handle",
    box_to_review: "To review", box_overdue: "Overdue", box_all: "All", no_cases: "No cases",
    pick_case: "Pick a case on the left",
    cs_registered: "To verify", cs_assessing: "Assessing", cs_community_handling: "Community handling",
    cs_whistled: "Whistled, to accept", cs_dept_handling: "Department handling",
    cs_en_route: "Accepted, on the way", cs_on_site: "On site", cs_reviewing: "To review",
    cs_rehandling: "Sent back", cs_closed: "Closed",
    act_verify: "Verify", act_not_ours: "Not ours", act_self_handle: "Handle ourselves",
    act_whistle: "Whistle", act_accept_off_site: "Accept (off site)",
    act_accept_on_site: "Accept (on site)", act_arrive: "Arrived", act_handle: "Report handling",
    act_accept_feedback: "Accept and close", act_send_back: "Send back",
    act_apply_extension: "Apply for extension", act_approve_extension: "Approve extension",
    act_refuse_extension: "Refuse extension", act_assign: "Assign", act_reminder: "Reminder",
    act_overdue: "Overdue supervision", act_escalate_street: "Escalated to the street",
    act_escalate_county: "Escalated to the county",
    clk_community_handle: "Community handling", clk_accept: "Department acceptance",
    clk_feedback: "Feedback", clk_arrive: "On site", clk_hard_close: "Hard problem closed",
    clk_rehandle: "Re-handling",
    k_case_state: "Case state", k_version: "Version", k_lead: "Lead department",
    k_co: "Co-departments", k_assignee: "Assigned to", k_handled_by: "Handled by", k_send_backs: "Sent back",
    k_extension: "Extension request", k_outcome: "Outcome",
    out_handled: "handled", out_not_ours: "not this community's",
    h_deadlines: "Stage deadlines", h_case_timeline: "Case timeline (audit trail)",
    h_actions: "Actions", c_stage: "Stage", c_due: "Due", c_left: "Left", left: "left",
    late_by: "overdue by", stopped: "done", on_time: "on time", late: "late",
    extended: "extended",
    f_note: "Note (optional)", f_reason: "Reason", f_summary: "Handling summary",
    f_photos: "Before/after photos (JPEG/PNG)", f_lead: "Lead department",
    f_co: "Co-departments", f_until: "New deadline", f_assignee: "Assign to (account)", submit: "Submit", cancel: "Cancel",
    required: "required", need_evidence: "Write a summary or upload a photo",
    need_reason: "Give a reason", need_lead: "Choose the lead department",
    case_changed: "Someone else changed the case; reloaded", uploading: "Uploading photos…", round: "send-back",
    evidence: "Evidence", no_case: "No case information",
    cm_title: "Case handling (Longgang 8.6 · Jiangsu 6.3)", by_person: "Person",
    cm_first_time: "First-time rate", cm_not_handled: "Not effectively handled",
    cm_note: "Handling rate = effectively handled / registered; on-time rate = closed with every stage on time / due; first-time rate = closed without a send-back / closed.",
    h_supervision: "Supervision", lv_community: "community", lv_department: "department",
    lv_street: "street", lv_county: "county", raised: "raised",
    cm_unavailable: "Case figures unavailable", cm_period: "Period", cm_all_time: "All time",
    cm_1d: "Last day", cm_7d: "Last 7 days", cm_30d: "Last 30 days", cm_365d: "Last year",
  },
};
const SEVERITIES = ["critical", "high", "medium", "low"];
const STATUSES = ["registered", "verified", "dispatched", "handling", "closed"];
const BOXES = ["to_accept", "to_handle", "to_review", "overdue"];

const state = {
  lang: localStorage.getItem("cwg.lang") || "zh",
  token: sessionStorage.getItem("cwg.token"),
  operator: null,
  events: new Map(), // event_id → EventItem, in the current filter
  order: [], // event ids as listed
  cursor: null,
  selected: null,
  grids: null,
  types: new Map(), // code → {zh, en}
  departments: new Map(), // code → {zh, en}
  places: new Map(), // county / street / community / grid code → {zh, en}
  ws: null,
  wsRetry: 0,
  tab: "events",
  deviceTimer: null,
  summaryTimer: null, // a totals refresh the stream asked for, at most one a second
  blobUrls: [],
  box: "to_accept", // the inbox shown in the cases tab
  caseId: null, // the case open in the cases tab
  inboxTimer: null, // an inbox refresh the stream asked for, at most one a second
};

// -- small helpers --------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const t = (key) => (I18N[state.lang][key] ?? key);

function h(tag, attrs = {}, ...children) {
  const el = document.createElementNS(
    tag === "svg" || attrs.svg ? "http://www.w3.org/2000/svg" : "http://www.w3.org/1999/xhtml",
    tag,
  );
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "svg" || v === null || v === undefined || v === false) continue;
    if (k === "class") el.setAttribute("class", v);
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const svg = (tag, attrs = {}, ...c) => h(tag, { ...attrs, svg: true }, ...c);

function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toLocaleString(state.lang === "zh" ? "zh-CN" : "en-GB", { hour12: false });
}
function ago(iso) {
  const s = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
  if (s < 60) return `${Math.round(s)} ${t("ago_s")}`;
  if (s < 3600) return `${Math.round(s / 60)} ${t("ago_m")}`;
  if (s < 86400) return `${Math.round(s / 3600)} ${t("ago_h")}`;
  return `${Math.round(s / 86400)} ${t("ago_d")}`;
}
const typeName = (ev) => (state.lang === "zh" ? ev.type_zh : ev.type_en) || ev.type;
const placeName = (level) => { const p = state.places.get(level.code); return (p && p[state.lang]) || level.name; };
const addressOf = (ev) => ev.grid_path.map(placeName).join(" › ");
const departmentName = (code) => { const d = state.departments.get(code); return d ? d[state.lang] : code; };

function learnPlaces() {
  state.places.clear();
  for (const f of state.grids?.features ?? []) {
    const p = f.properties;
    for (const level of ["county", "street", "community"]) {
      const zh = p[`${level}_name`];
      state.places.set(p[`${level}_code`], { zh, en: p[`${level}_name_en`] || zh });
    }
    state.places.set(p.code, { zh: p.name, en: p.name_en || p.name });
  }
}

class HttpError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(path, { method = "GET", body, raw = false } = {}) {
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(API + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401 && state.token) { logout(); throw new HttpError(401, "logged out"); }
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = (await res.json()).detail; } catch (_) { /* not JSON */ }
    throw new HttpError(res.status, typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  if (raw) return res;
  return res.status === 204 ? null : res.json();
}

// -- i18n -------------------------------------------------------------------------------------

function applyLang() {
  document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
  $("lang").textContent = state.lang === "zh" ? "EN" : "中文";
  $("live-text").textContent = t(state.ws && state.ws.readyState === 1 ? "live" : "offline");
  if (state.operator) {
    fillFilters();
    renderList();
    drawMap();
    if (state.selected) openDetail(state.selected, false);
    if (state.tab === "devices") loadDevices();
    if (state.tab === "handling") loadHandling();
    if (state.tab === "cases") { loadInbox(); if (state.caseId) openCase(state.caseId); }
    loadSummary();
  }
}

// -- login ------------------------------------------------------------------------------------

async function login(ev) {
  ev.preventDefault();
  $("login-error").textContent = "";
  try {
    const res = await fetch(`${API}/auth/token`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ username: $("username").value, password: $("password").value }),
    });
    const data = await res.json();
    if (res.status === 429) throw new Error(`${data.detail} (${res.headers.get("Retry-After") || "?"} s)`);
    if (!res.ok) throw new Error(data.detail || t("login_failed"));
    state.token = data.access_token;
    sessionStorage.setItem("cwg.token", state.token);
    $("password").value = "";
    await start();
  } catch (err) {
    $("login-error").textContent = `${t("login_failed")}: ${err.message}`;
  }
}

function logout() {
  const token = state.token;
  state.token = null;
  state.operator = null;
  sessionStorage.removeItem("cwg.token");
  if (token) fetch(`${API}/auth/logout`, { method: "POST", headers: { Authorization: `Bearer ${token}` } }).catch(() => {});
  if (state.ws) { state.ws.onclose = null; state.ws.close(); state.ws = null; }
  clearInterval(state.deviceTimer);
  setLive(false);
  $("login-view").hidden = false;
  $("events-view").hidden = true;
  $("devices-view").hidden = true;
  $("cases-view").hidden = true;
  $("handling-view").hidden = true;
  $("tabs").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
}

async function start() {
  try {
    state.operator = await api("/auth/me");
  } catch (_) {
    logout();
    return;
  }
  const op = state.operator;
  $("who").textContent = `${op.display_name} · ${op.level}${op.scope_code ? " " + op.scope_code : ""}${op.department ? " " + op.department : ""}`;
  $("login-view").hidden = true;
  $("tabs").hidden = false;
  $("logout").hidden = false;
  showTab("events");
  const [grids, catalogue] = await Promise.all([api("/grids"), api("/catalogue")]);
  state.grids = grids;
  learnPlaces();
  for (const ty of catalogue.types) state.types.set(ty.code, { zh: ty.zh, en: ty.en });
  for (const d of catalogue.departments) state.departments.set(d.code, { zh: d.zh, en: d.en });
  fillFilters();
  fitMap();
  await loadEvents(true);
  loadSummary();
  connectStream();
}

// -- filters and list -------------------------------------------------------------------------

function fillFilters() {
  const keep = (sel) => sel.value;
  const typeSel = $("f-type"), sevSel = $("f-severity"), stSel = $("f-status"), comSel = $("f-community");
  const values = [keep(typeSel), keep(sevSel), keep(stSel), keep(comSel)];
  for (const sel of [typeSel, sevSel, stSel, comSel]) sel.replaceChildren(h("option", { value: "", text: t("all") }));
  for (const [code, names] of state.types) typeSel.append(h("option", { value: code, text: names[state.lang] }));
  for (const s of SEVERITIES) sevSel.append(h("option", { value: s, text: t("sev_" + s) }));
  for (const s of STATUSES) stSel.append(h("option", { value: s, text: t("st_" + s) }));
  const communities = new Map();
  for (const f of state.grids?.features ?? []) {
    const p = f.properties;
    communities.set(p.community_code, state.lang === "zh" ? p.community_name : (p.community_name_en || p.community_name));
  }
  for (const [code, name] of [...communities].sort()) comSel.append(h("option", { value: code, text: name }));
  [typeSel.value, sevSel.value, stSel.value, comSel.value] = values;
}

function filterParams() {
  const p = new URLSearchParams();
  for (const [name, id] of [["type", "f-type"], ["severity", "f-severity"], ["status", "f-status"], ["grid", "f-community"]]) {
    const v = $(id).value;
    if (v) p.set(name, v);
  }
  return p;
}

function matchesFilters(ev) {
  const p = filterParams();
  if (p.get("type") && ev.type !== p.get("type")) return false;
  if (p.get("severity") && ev.severity !== p.get("severity")) return false;
  if (p.get("status") && ev.status !== p.get("status")) return false;
  if (p.get("grid") && !ev.grid_code.startsWith(p.get("grid"))) return false;
  return true;
}

async function loadEvents(reset) {
  const params = filterParams();
  params.set("limit", "100");
  if (!reset && state.cursor) params.set("cursor", state.cursor);
  const page = await api(`/events?${params}`);
  if (reset) { state.events.clear(); state.order = []; }
  for (const ev of page.items) {
    rememberType(ev);
    if (!state.events.has(ev.event_id)) state.order.push(ev.event_id);
    state.events.set(ev.event_id, ev);
  }
  state.cursor = page.next_cursor;
  $("more").hidden = !state.cursor;
  if (reset && state.types.size) fillFilters();
  renderList();
  drawMarkers();
}

function rememberType(ev) {
  if (!state.types.has(ev.type)) {
    state.types.set(ev.type, { zh: ev.type_zh, en: ev.type_en });
    fillFilters();
  }
}

// fresh: the id (or a Set of the ids) of events just created, shown highlighted
function isFresh(fresh, id) {
  return fresh instanceof Set ? fresh.has(id) : id === fresh;
}

function renderList(fresh) {
  const list = $("event-list");
  list.replaceChildren(...state.order.map((id) => eventRow(state.events.get(id), isFresh(fresh, id))));
  $("list-empty").hidden = state.order.length > 0;
}

function eventRow(ev, fresh) {
  const grid = ev.grid_path[ev.grid_path.length - 1];
  const community = ev.grid_path.find((g) => g.level === "community");
  const where = `${community ? placeName(community) + " › " : ""}${placeName(grid)}`;
  const badges = [];
  if (ev.status === "closed") badges.push(h("span", { class: "badge closed", text: t("st_closed") }));
  else if (ev.overdue) badges.push(h("span", { class: "badge overdue", text: t("overdue") }));
  else badges.push(h("span", { class: "badge", text: t("st_" + ev.status) }));
  return h("li", {
    class: `event${fresh ? " fresh" : ""}${ev.event_id === state.selected ? " selected" : ""}`,
    "data-event-id": ev.event_id,
    onclick: () => openDetail(ev.event_id, true),
  },
  h("span", { class: `bar ${ev.severity}` }),
  h("span", { class: "name" }, typeName(ev), ...badges),
  h("span", { class: "when", text: ago(ev.last_observed_at) }),
  h("span", { class: "where", text: `#${ev.event_id} · ${where} · ${ev.alert_count} ${t("alerts_n")}` }));
}

async function loadSummary() {
  try {
    const s = await api("/stats");
    $("summary").replaceChildren(
      h("div", { class: "stat" }, h("b", { text: s.events }), h("span", { text: t("total") })),
      h("div", { class: "stat" }, h("b", { text: s.open_events }), h("span", { text: t("open") })),
      h("div", { class: "stat overdue" }, h("b", { text: s.overdue_events }), h("span", { text: t("overdue") })),
    );
    for (const ty of s.by_type) if (!state.types.has(ty.type)) state.types.set(ty.type, { zh: ty.zh, en: ty.en });
  } catch (_) { /* the summary is a nicety */ }
}

// -- live stream ------------------------------------------------------------------------------

function setLive(on) {
  $("live").classList.toggle("on", on);
  $("live").classList.toggle("off", !on);
  $("live-text").textContent = t(on ? "live" : "offline");
}

function connectStream() {
  if (!state.token) return;
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  // The token goes in the first message, never in the URL (access logs keep URLs).
  const ws = new WebSocket(`${proto}//${location.host}${API}/stream`);
  state.ws = ws;
  ws.onopen = () => { ws.send(JSON.stringify({ token: state.token })); };
  ws.onmessage = (m) => {
    let msg;
    try { msg = JSON.parse(m.data); } catch (_) { return; }
    if (msg.kind === "authenticated") { state.wsRetry = 0; setLive(true); }
    // A frame is one item, or a batch of all that was due in one tick: applied together,
    // drawn once.
    else if (msg.kind === "batch" && Array.isArray(msg.items)) onEventNotices(msg.items.filter((i) => i && i.kind === "event"));
    else if (msg.kind === "event") onEventNotices([msg]);
    else if (msg.kind === "dropped") console.warn(t("dropped"));
  };
  ws.onclose = (e) => {
    setLive(false);
    if (!state.token) return;
    if (e.code === 1008) { logout(); return; } // the stream refused the token: log in again
    // Dropped as a slow consumer (1013) or a network blip: reconnect, and reload the list so
    // nothing missed while away stays missing.
    const delay = Math.min(10000, 500 * 2 ** state.wsRetry++);
    setTimeout(() => { if (state.token) { loadEvents(true).catch(() => {}); connectStream(); } }, e.code === 1013 ? 200 : delay);
  };
}

function onEventNotices(notices) {
  if (!notices.length) return;
  // A case step moves its event: the inbox and an open case follow, whatever the filters.
  if (state.tab === "cases") casesLater(notices.map((m) => m.event.event_id));
  const fresh = new Set();
  let listChanged = false, mapChanged = false, selectedChanged = false;
  for (const msg of notices) {
    const summary = msg.event;
    rememberType(summary);
    const known = state.events.get(summary.event_id);
    const ev = { ...(known || {}), ...summary };
    ev.overdue = ev.status !== "closed" && new Date(ev.deadline_at) < new Date();
    ev.snapshot_url = summary.snapshot_sha256 ? `${API}/snapshots/${summary.snapshot_sha256}` : null;
    if (!matchesFilters(ev)) {
      if (known) { state.events.delete(ev.event_id); state.order = state.order.filter((id) => id !== ev.event_id); listChanged = true; }
      continue;
    }
    state.events.set(ev.event_id, ev);
    if (!known) state.order.unshift(ev.event_id);
    if (msg.change === "created") fresh.add(ev.event_id);
    listChanged = true;
    const cell = state.grids?.features.find((f) => f.id === ev.grid_code);
    if (cell && (msg.change === "created" || msg.change === "closed")) {
      // Keep the grid shading in step with the stream instead of reloading the polygons.
      const p = cell.properties;
      if (msg.change === "created") { p.event_count += 1; p.open_event_count += 1; }
      else p.open_event_count = Math.max(0, p.open_event_count - 1);
      mapChanged = true;
    }
    if (state.selected === ev.event_id) selectedChanged = true;
  }
  if (!listChanged) return;
  renderList(fresh);
  if (mapChanged) drawMap();
  drawMarkers(fresh);
  if (selectedChanged) openDetail(state.selected, false, true);
  summaryLater();
}

// The totals follow the stream at most once a second: a busy tick must not cost the API a
// statistics query per notice and per operator.
function summaryLater() {
  if (state.summaryTimer) return;
  state.summaryTimer = setTimeout(() => { state.summaryTimer = null; loadSummary(); }, 1000);
}

// -- map --------------------------------------------------------------------------------------

// touched: the operator panned or zoomed; until then the map keeps fitting its panel.
const view = { k: 1, tx: 0, ty: 0, lon0: 0, lat0: 0, cos: 1, touched: false };

function project(lon, lat) {
  return [(lon - view.lon0) * view.cos * 1e4, -(lat - view.lat0) * 1e4];
}

function fitMap() {
  const box = state.grids?.bbox;
  const el = $("map");
  if (!box) return;
  const [w, s, e, n] = box;
  view.lon0 = (w + e) / 2;
  view.lat0 = (s + n) / 2;
  view.cos = Math.cos((view.lat0 * Math.PI) / 180);
  const width = el.clientWidth || 800, height = el.clientHeight || 600;
  const [x0, y0] = project(w, n), [x1, y1] = project(e, s);
  view.k = 0.92 * Math.min(width / (x1 - x0 || 1), height / (y1 - y0 || 1));
  view.tx = width / 2 - ((x0 + x1) / 2) * view.k;
  view.ty = height / 2 - ((y0 + y1) / 2) * view.k;
  drawMap();
}

function ringPath(ring) {
  return ring.map(([lon, lat], i) => { const [x, y] = project(lon, lat); return `${i ? "L" : "M"}${x.toFixed(2)},${y.toFixed(2)}`; }).join("") + "Z";
}
function geometryPath(g) {
  const polys = g.type === "Polygon" ? [g.coordinates] : g.coordinates;
  return polys.map((rings) => rings.map(ringPath).join("")).join("");
}

function drawMap() {
  const el = $("map");
  if (!state.grids) return;
  const layer = svg("g", { id: "world", transform: `translate(${view.tx},${view.ty}) scale(${view.k})` });
  const cells = svg("g", { id: "grids" });
  const labels = svg("g", { id: "labels" });
  const communities = new Map();
  const active = $("f-community").value;
  for (const f of state.grids.features) {
    const p = f.properties;
    const open = p.open_event_count > 0;
    cells.append(svg("path", {
      d: geometryPath(f.geometry),
      class: `gridcell${open ? " has-open" : ""}${active && p.community_code === active ? " active" : ""}`,
      "data-code": p.code,
      onmousemove: (e) => tip(e, `${state.lang === "zh" ? p.name : p.name_en || p.name}\n${p.code}\n${t("open")}: ${p.open_event_count} / ${t("total")}: ${p.event_count}`),
      onmouseleave: () => { $("map-tip").hidden = true; },
    }));
    const c = communities.get(p.community_code) || { n: 0, x: 0, y: 0, name: state.lang === "zh" ? p.community_name : p.community_name_en || p.community_name };
    const ring = f.geometry.type === "Polygon" ? f.geometry.coordinates[0] : f.geometry.coordinates[0][0];
    for (const [lon, lat] of ring) { const [x, y] = project(lon, lat); c.x += x; c.y += y; c.n++; }
    communities.set(p.community_code, c);
  }
  for (const c of communities.values()) {
    labels.append(svg("text", { x: c.x / c.n, y: c.y / c.n, "text-anchor": "middle", class: "community-label", "font-size": 13 / view.k, "stroke-width": 3 / view.k, text: c.name }));
  }
  layer.append(cells, labels, svg("g", { id: "markers" }));
  el.replaceChildren(layer);
  drawMarkers();
}

function drawMarkers(fresh) {
  const layer = document.getElementById("markers");
  if (!layer) return;
  const r = 7 / view.k;
  const nodes = [];
  for (const id of [...state.order].reverse()) {
    const ev = state.events.get(id);
    const [x, y] = project(ev.location.lon, ev.location.lat);
    if (isFresh(fresh, id)) nodes.push(svg("circle", { cx: x, cy: y, r: r * 2.6, class: "pulse" }));
    nodes.push(svg("circle", {
      cx: x, cy: y, r, class: `marker ${ev.severity}${ev.status === "closed" ? " closed" : ""}${id === state.selected ? " selected" : ""}`,
      "data-event-id": id,
      onclick: (e) => { e.stopPropagation(); openDetail(id, true); },
      onmousemove: (e) => tip(e, `#${id} ${typeName(ev)}\n${addressOf(ev)}`),
      onmouseleave: () => { $("map-tip").hidden = true; },
    }));
  }
  layer.replaceChildren(...nodes);
}

function tip(e, text) {
  const box = $("map").getBoundingClientRect();
  const el = $("map-tip");
  el.hidden = false;
  el.replaceChildren(...text.split("\n").flatMap((line, i) => (i ? [h("br"), line] : [line])));
  el.style.left = `${e.clientX - box.left + 12}px`;
  el.style.top = `${e.clientY - box.top + 12}px`;
}

function refit() {
  if (state.grids && !view.touched) requestAnimationFrame(fitMap);
}

function zoomAt(factor, cx, cy) {
  view.touched = true;
  const k = Math.max(0.05, Math.min(view.k * factor, 2000));
  factor = k / view.k;
  view.tx = cx - (cx - view.tx) * factor;
  view.ty = cy - (cy - view.ty) * factor;
  view.k = k;
  drawMap();
}

function setupMapControls() {
  const el = $("map");
  let drag = null;
  el.addEventListener("wheel", (e) => {
    e.preventDefault();
    const box = el.getBoundingClientRect();
    zoomAt(e.deltaY < 0 ? 1.2 : 1 / 1.2, e.clientX - box.left, e.clientY - box.top);
  }, { passive: false });
  el.addEventListener("pointerdown", (e) => { drag = { x: e.clientX, y: e.clientY, tx: view.tx, ty: view.ty }; el.classList.add("dragging"); });
  window.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (!view.touched && Math.hypot(dx, dy) < 4) return; // a click, not a drag
    view.touched = true;
    view.tx = drag.tx + dx;
    view.ty = drag.ty + dy;
    const world = document.getElementById("world");
    if (world) world.setAttribute("transform", `translate(${view.tx},${view.ty}) scale(${view.k})`);
  });
  window.addEventListener("pointerup", () => { drag = null; el.classList.remove("dragging"); });
  const centre = () => [el.clientWidth / 2, el.clientHeight / 2];
  $("zoom-in").onclick = () => zoomAt(1.5, ...centre());
  $("zoom-out").onclick = () => zoomAt(1 / 1.5, ...centre());
  $("zoom-fit").onclick = () => { view.touched = false; fitMap(); };
  window.addEventListener("resize", refit);
}

// -- detail -----------------------------------------------------------------------------------

// passive: a refresh nobody asked for (the stream); it leaves a half-filled case form alone.
const formOpen = (el) => Boolean(el && el.querySelector(".c-form"));

async function openDetail(id, fromClick, passive) {
  if (passive && formOpen($("d-case"))) return;
  state.selected = id;
  for (const el of document.querySelectorAll(".event.selected, .marker.selected")) el.classList.remove("selected");
  for (const el of document.querySelectorAll(`[data-event-id="${id}"]`)) el.classList.add("selected");
  let d;
  try {
    d = await api(`/events/${id}`);
  } catch (err) {
    $("d-body").replaceChildren(h("p", { class: "error", text: `${t("error")}: ${err.message}` }));
    return;
  }
  if (state.selected !== id) return;
  if (passive && formOpen($("d-case"))) return;
  if ($("detail").hidden) { $("detail").hidden = false; refit(); }
  $("d-title").textContent = `#${d.event_id} ${typeName(d)}`;
  for (const u of state.blobUrls) URL.revokeObjectURL(u);
  state.blobUrls = [];

  const img = h("img", { class: "snapshot", id: "d-snapshot", alt: t("h_snapshots") });
  const thumbs = h("div", { class: "thumbs" });
  if (d.snapshot_url) showSnapshot(img, d.snapshot_url);
  const snapshot = d.snapshot_url ? img : h("p", { class: "muted", text: t("no_snapshot") });
  if (d.snapshot_urls.length > 1) {
    for (const url of d.snapshot_urls) {
      const th = h("img", { alt: "", class: url === d.snapshot_url ? "current" : "" });
      th.onclick = () => { showSnapshot(img, url); for (const x of thumbs.children) x.classList.toggle("current", x === th); };
      loadBlob(url).then((u) => { th.src = u; }).catch(() => {});
      thumbs.append(th);
    }
  }
  const facts = h("dl", { class: "facts" });
  const fact = (k, v) => facts.append(h("dt", { text: t(k) }), h("dd", {}, v));
  fact("k_status", h("span", {}, t("st_" + d.status), d.overdue ? h("span", { class: "badge overdue", text: t("overdue") }) : null));
  fact("k_severity", t("sev_" + d.severity));
  fact("k_department", departmentName(d.department));
  fact("k_address", addressOf(d));
  fact("k_grid", d.grid_code);
  fact("k_description", d.description);
  fact("k_observed", `${fmtTime(d.first_observed_at)} – ${fmtTime(d.last_observed_at)}`);
  fact("k_registered", fmtTime(d.registered_at));
  fact("k_deadline", fmtTime(d.deadline_at));
  fact("k_alerts", `${d.alert_count} · ${d.device_count} ${t("devices_n")}: ${d.devices.map((x) => x.device_id).join(", ")}`);
  if (d.recurrence_of) fact("k_recurrence", `#${d.recurrence_of}`);

  // The case: its actions, deadlines and audit timeline (a department account sees only the
  // cases whistled to it; for others the box stays empty).
  const caseBox = h("div", { class: "case-box", id: "d-case" });
  renderCase(caseBox, d.event_id, false);

  const alerts = h("table", { class: "small" },
    h("thead", {}, h("tr", {}, ["c_device", "c_time", "c_conf", "c_outcome"].map((k) => h("th", { text: t(k) })))),
    h("tbody", {}, d.alerts.map((a) => h("tr", {},
      h("td", { text: a.device_id }), h("td", { text: fmtTime(a.observed_at) }),
      h("td", { text: a.confidence.toFixed(2) }), h("td", { text: t(a.outcome) }))))
  );
  const timeline = h("ol", { class: "timeline" }, d.timeline.map((e) => h("li", {},
    h("time", { text: fmtTime(e.at) }),
    e.kind === "alert" ? `${e.actor} · ${t(e.action)}` : `${e.actor} · ${logAction(e.action)}${e.detail && e.detail.note ? " — " + e.detail.note : ""}`)));

  $("d-body").replaceChildren(
    snapshot, thumbs, facts, caseBox,
    h("h3", { text: t("h_alerts") }), alerts,
    h("h3", { text: t("h_timeline") }), timeline,
  );
  if (fromClick) {
    const row = document.querySelector(`.event[data-event-id="${id}"]`);
    if (row) row.scrollIntoView({ block: "nearest" });
  }
}

// urls: the list the object URL is kept in, revoked when its view is redrawn
// An event log entry's action: a status change, a case step ("case:<action>"), or ingest's own.
function logAction(action) {
  if (action.startsWith("status:")) return t("st_" + action.slice(7));
  if (action.startsWith("case:")) return actionName(action.slice(5), null);
  return t(action);
}

async function loadBlob(url, urls = state.blobUrls) {
  const res = await fetch(url, { headers: { Authorization: `Bearer ${state.token}` } });
  if (!res.ok) throw new HttpError(res.status, res.statusText);
  const u = URL.createObjectURL(await res.blob());
  urls.push(u);
  return u;
}

function showSnapshot(img, url) {
  loadBlob(url).then((u) => { img.src = u; }).catch(() => { img.alt = t("no_snapshot"); });
}

// -- cases (issue 15): inbox, case view, steps, evidence, timeline ---------------------------

const stateName = (s) => t("cs_" + s);
// An action's label: the server's Chinese name from the lifecycle table, or its English one.
function actionName(action, zhNames) {
  if (state.lang === "zh") return (zhNames && zhNames[action]) || I18N.zh["act_" + action] || action;
  return I18N.en["act_" + action] || action;
}

// The case clock's now less this browser's, from the last answer's as_of: deadlines are judged
// by the server's case clock (which a simulation may run ahead), not by this machine's.
function learnSkew(asOf) {
  if (asOf) state.caseSkew = new Date(asOf).getTime() - Date.now();
}

function countdown(dueIso) {
  const s = Math.round((new Date(dueIso).getTime() - (Date.now() + (state.caseSkew || 0))) / 1000);
  const a = Math.abs(s);
  const d = Math.floor(a / 86400), hh = Math.floor((a % 86400) / 3600), mm = Math.floor((a % 3600) / 60), ss = a % 60;
  const txt = d ? `${d}d ${hh}h ${mm}m` : hh ? `${hh}h ${mm}m` : `${mm}m ${String(ss).padStart(2, "0")}s`;
  return { late: s < 0, text: s < 0 ? `${t("late_by")} ${txt}` : `${t("left")} ${txt}` };
}

// A live countdown: every element with data-due is rewritten each second.
function countdownEl(dueIso, serverOverdue) {
  const el = h("span", { class: "countdown", "data-due": dueIso });
  if (serverOverdue) el.dataset.overdue = "1";
  paintCountdown(el);
  return el;
}
function paintCountdown(el) {
  const c = countdown(el.dataset.due);
  el.textContent = c.text;
  el.classList.toggle("overdue", c.late || el.dataset.overdue === "1");
}
function tickCountdowns() {
  for (const el of document.querySelectorAll(".countdown[data-due]")) paintCountdown(el);
}

async function loadInbox() {
  if (!state.operator) return;
  const q = state.box ? `?box=${encodeURIComponent(state.box)}` : "";
  let page;
  try { page = await api(`/cases${q}`); } catch (_) { return; }
  learnSkew(page.as_of);
  $("case-list").replaceChildren(...page.items.map(caseRow));
  $("case-empty").hidden = page.items.length > 0;
  // the counts of the four boxes, beside their names
  await Promise.all(BOXES.map(async (box) => {
    const el = document.querySelector(`#boxes .box[data-box="${box}"] .count`);
    try { el.textContent = (await api(`/cases?box=${box}`)).items.length; } catch (_) { el.textContent = ""; }
  }));
}

function caseRow(c) {
  const badges = [h("span", { class: `badge state-${c.state}`, text: stateName(c.state) })];
  if (c.overdue) badges.push(h("span", { class: "badge overdue", text: t("overdue") }));
  const ty = state.types.get(c.type);
  return h("li", {
    class: `event case${c.overdue ? " is-overdue" : ""}${c.event_id === state.caseId ? " selected" : ""}`,
    "data-event-id": c.event_id,
    onclick: () => openCase(c.event_id),
  },
  h("span", { class: `bar ${c.severity}` }),
  h("span", { class: "name" }, (ty && ty[state.lang]) || c.type, ...badges),
  h("span", { class: "when" }, c.next_due_at && c.state !== "closed" ? countdownEl(c.next_due_at, c.overdue) : ""),
  h("span", { class: "where", text: `#${c.event_id} · ${c.address || c.grid_code}${c.lead_department ? " · " + departmentName(c.lead_department) : ""}` }));
}

// The stream's notices move the inbox and an open case at most once a second.
function casesLater(ids) {
  if (state.caseId && ids.includes(state.caseId)) state.caseDirty = true;
  if (state.inboxTimer) return;
  state.inboxTimer = setTimeout(() => {
    state.inboxTimer = null;
    loadInbox();
    if (state.caseDirty && state.caseId) { state.caseDirty = false; openCase(state.caseId, true); }
  }, 1000);
}

async function openCase(id, fromStream) {
  state.caseId = id;
  for (const el of document.querySelectorAll("#case-list .case")) el.classList.toggle("selected", Number(el.dataset.eventId) === id);
  const box = $("c-body");
  // Someone is filling in a form: a refresh from the stream would wipe it; the step's
  // compare-and-set tells them if the case moved meanwhile.
  if (fromStream && formOpen(box)) return;
  $("c-pick").hidden = true;
  $("c-title").textContent = `#${id}`;
  await renderCase(box, id, fromStream, (c) => {
    const ty = state.types.get(c.type);
    $("c-title").textContent = `#${c.event_id} ${(ty && ty[state.lang]) || c.type} · ${stateName(c.state)}`;
  });
}

// Refresh whatever shows this case: the cases tab, the event detail, the lists.
async function afterStep(id) {
  if (state.caseId === id && !$("cases-view").hidden) await openCase(id);
  if (state.selected === id) {
    try {
      const ev = await api(`/events/${id}`);
      if (state.events.has(id)) { state.events.set(id, ev); renderList(); drawMarkers(); }
    } catch (_) { /* a department account may not see the event itself */ }
    if (!$("detail").hidden) await openDetail(id, false);
  }
  if (state.tab === "cases") loadInbox();
  loadSummary();
}

// passive: see openDetail. Only the newest of overlapping renders of one container is drawn.
async function renderCase(container, id, passive, onLoad) {
  const seq = (container.renderSeq || 0) + 1;
  container.renderSeq = seq;
  let c, trail;
  try {
    [c, trail] = await Promise.all([api(`/cases/${id}`), api(`/cases/${id}/trail`)]);
  } catch (err) {
    if (container.renderSeq !== seq || (passive && formOpen(container))) return;
    container.replaceChildren(err.status === 404 ? h("p", { class: "muted", text: t("no_case") }) : h("p", { class: "error", text: `${t("error")}: ${err.message}` }));
    return;
  }
  if (container.renderSeq !== seq || (passive && formOpen(container))) return;
  learnSkew(c.as_of);
  for (const u of container.blobUrls || []) URL.revokeObjectURL(u);
  container.blobUrls = [];
  if (onLoad) onLoad(c);

  const facts = h("dl", { class: "facts" });
  const fact = (k, v) => facts.append(h("dt", { text: t(k) }), h("dd", {}, v));
  fact("k_case_state", h("span", { class: "case-state", "data-state": c.state }, stateName(c.state),
    c.overdue ? h("span", { class: "badge overdue", text: t("overdue") }) : null,
    c.outcome ? h("span", { class: "badge closed", text: t("out_" + c.outcome) }) : null));
  fact("k_version", String(c.version));
  if (c.lead_department) fact("k_lead", departmentName(c.lead_department));
  if (c.co_departments.length) fact("k_co", c.co_departments.map(departmentName).join("、"));
  if (c.assignee) fact("k_assignee", c.assignee);
  if (c.handled_by) fact("k_handled_by", c.handled_by);
  if (c.send_backs) fact("k_send_backs", String(c.send_backs));
  if (c.extension) fact("k_extension", `${c.extension.by}: ${c.extension.reason}${c.extension.until ? " → " + fmtTime(c.extension.until) : ""}`);

  const deadlines = c.deadlines.length ? h("table", { class: "small deadlines" },
    h("thead", {}, h("tr", {}, ["c_stage", "c_due", "c_left"].map((k) => h("th", { text: t(k) })))),
    h("tbody", {}, c.deadlines.map((d) => h("tr", {
      class: `deadline${d.running ? " running" : ""}${d.overdue ? " overdue" : ""}${d.late ? " late" : ""}`,
      "data-clock": d.clock,
    },
    h("td", { text: (state.lang === "zh" ? d.zh : I18N.en["clk_" + d.clock] || d.clock) + (d.round ? ` · ${t("round")} ${d.round}` : "") }),
    h("td", { text: fmtTime(d.due_at) + (d.extended ? ` · ${t("extended")}` : "") }),
    h("td", {}, d.running ? countdownEl(d.due_at, d.overdue) : h("span", { class: d.late ? "late" : "ok", text: `${t("stopped")} · ${t(d.late ? "late" : "on_time")}` })))))) : null;

  const actions = c.allowed_actions.length || c.may_assign ? caseActions(container, c) : null;

  // Supervision (督办) the timer raised: reminders, overdue items, escalations.
  const items = c.supervision || [];
  const supervision = items.length ? h("ul", { class: "supervision" }, items.map((s) => h("li", {
    class: `sv ${s.kind}`, "data-kind": s.kind, "data-clock": s.clock,
  },
  h("b", { text: state.lang === "zh" ? s.kind_zh : actionName(s.kind, null) }),
  ` · ${state.lang === "zh" ? (c.deadlines.find((d) => d.clock === s.clock)?.zh || s.clock) : (I18N.en["clk_" + s.clock] || s.clock)}`,
  ` → ${t("lv_" + s.level)} · ${t("raised")} ${fmtTime(s.raised_at)}`))) : null;

  const timeline = h("ol", { class: "timeline case-timeline" }, trail.rows.map((r) => {
    const li = h("li", { "data-action": r.action, "data-seq": r.seq },
      h("time", { text: fmtTime(r.at) }),
      h("b", { text: actionName(r.action, null) }),
      ` · ${r.actor} (${r.role})`,
      r.before !== r.after ? ` · ${stateName(r.before)} → ${stateName(r.after)}` : "",
      r.reason ? h("div", { class: "reason", text: r.reason }) : null,
      r.note ? h("div", { class: "note", text: r.note }) : null);
    if (r.evidence.length) {
      const pics = h("div", { class: "thumbs evidence" });
      for (const sha of r.evidence) {
        const img = h("img", { alt: t("evidence"), "data-sha256": sha, title: sha.slice(0, 12) });
        loadBlob(`${API}/evidence/${sha}`, container.blobUrls).then((u) => { img.src = u; }).catch(() => {});
        pics.append(img);
      }
      li.append(pics);
    }
    return li;
  }));

  container.replaceChildren(...[
    facts,
    actions ? h("h3", { text: t("h_actions") }) : null, actions,
    deadlines ? h("h3", { text: t("h_deadlines") }) : null, deadlines,
    supervision ? h("h3", { text: t("h_supervision") }) : null, supervision,
    h("h3", { text: t("h_case_timeline") }), timeline,
  ].filter(Boolean));
}

// The buttons are the case's allowed_actions, nothing else; each form asks for what the
// action's inputs (from the lifecycle table) name.
function caseActions(container, c) {
  const error = h("p", { class: "error c-error", role: "alert" });
  const forms = h("div", { class: "c-forms" });
  const buttons = h("div", { class: "buttons" }, c.allowed_actions.map((action) => {
    const inputs = c.action_inputs[action] || { requires: [], optional: [] };
    return h("button", {
      type: "button",
      class: "c-action",
      "data-action": action,
      text: actionName(action, c.actions_zh),
      onclick: () => {
        error.textContent = "";
        if (!inputs.requires.length && !inputs.optional.length) {
          takeStep(c, action, {}, [], error);
          return;
        }
        // Renders still in flight were asked for before this form: they must not wipe it.
        container.renderSeq = (container.renderSeq || 0) + 1;
        forms.replaceChildren(stepForm(c, action, inputs, error, () => forms.replaceChildren()));
      },
    });
  }));
  if (c.may_assign) {
    buttons.append(h("button", {
      type: "button",
      class: "c-assign-open",
      text: `${t("act_assign")}…`,
      onclick: () => {
        error.textContent = "";
        container.renderSeq = (container.renderSeq || 0) + 1;
        forms.replaceChildren(assignForm(c, error, () => forms.replaceChildren()));
      },
    }));
  }
  return h("div", { class: "actions" }, buttons, forms, error);
}

// Assign the case to a person of its community or of a department it was whistled to (the
// server decides who qualifies); empty: unassign.
function assignForm(c, error, close) {
  const who = h("input", { class: "c-assignee", name: "assignee", maxlength: 64, value: c.assignee || "", autocomplete: "off" });
  const note = h("textarea", { class: "c-note", name: "note", maxlength: 4000, placeholder: t("f_note") });
  const submit = h("button", { type: "submit", class: "primary c-submit", text: `${t("submit")} · ${t("act_assign")}` });
  const form = h("form", { class: "c-form", "data-for": "assign" },
    h("label", {}, h("span", { text: t("f_assignee") }), who),
    h("label", {}, h("span", { text: t("f_note") }), note),
    h("div", { class: "buttons" }, submit, h("button", { type: "button", class: "ghost", text: t("cancel"), onclick: close })));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    error.textContent = "";
    submit.disabled = true;
    try {
      await api(`/cases/${c.event_id}/assign`, {
        method: "POST",
        body: { assignee: who.value.trim() || null, expected_version: c.version, note: note.value.trim() || null },
      });
    } catch (err) {
      error.textContent = `${t("error")}: ${err.message}`;
      submit.disabled = false;
      return;
    }
    await afterStep(c.event_id);
  });
  return form;
}

function stepForm(c, action, inputs, error, close) {
  const needs = (x) => inputs.requires.includes(x);
  const takes = (x) => needs(x) || inputs.optional.includes(x);
  const label = (key, field, req) => h("label", {}, h("span", { text: t(key) + (req ? ` (${t("required")})` : "") }), field);
  const fields = [];
  let reason, summary, photos, lead, co, until;
  if (takes("departments")) {
    lead = h("select", { class: "c-lead", name: "lead_department" },
      h("option", { value: "", text: "—" }),
      [...state.departments].map(([code, n]) => h("option", { value: code, text: `${n[state.lang]} (${code})` })));
    co = h("div", { class: "c-co" }, [...state.departments].map(([code, n]) => h("label", { class: "check" },
      h("input", { type: "checkbox", value: code, name: "co_departments" }), ` ${n[state.lang]}`)));
    fields.push(label("f_lead", lead, needs("departments")), h("div", {}, h("span", { class: "muted", text: t("f_co") }), co));
  }
  if (takes("reason")) {
    reason = h("textarea", { class: "c-reason", name: "reason", maxlength: 4000 });
    fields.push(label("f_reason", reason, needs("reason")));
  }
  if (takes("evidence")) {
    summary = h("textarea", { class: "c-summary", name: "summary", maxlength: 4000 });
    photos = h("input", { type: "file", class: "c-photos", name: "photos", accept: "image/jpeg,image/png", multiple: true });
    fields.push(label("f_summary", summary, false), label("f_photos", photos, false));
  }
  if (takes("until")) {
    until = h("input", { type: "datetime-local", class: "c-until", name: "until" });
    fields.push(label("f_until", until, needs("until")));
  }
  const note = h("textarea", { class: "c-note", name: "note", maxlength: 4000, placeholder: t("f_note") });
  fields.push(label("f_note", note, false));
  const submit = h("button", { type: "submit", class: "primary c-submit", text: `${t("submit")} · ${actionName(action, c.actions_zh)}` });
  const form = h("form", { class: "c-form", "data-for": action },
    ...fields,
    h("div", { class: "buttons" }, submit, h("button", { type: "button", class: "ghost", text: t("cancel"), onclick: close })));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    error.textContent = "";
    // Hints only, so an operator is told before a round trip; the server checks all of it.
    if (needs("reason") && !reason.value.trim()) { error.textContent = t("need_reason"); return; }
    if (needs("departments") && !lead.value) { error.textContent = t("need_lead"); return; }
    if (needs("evidence") && !summary.value.trim() && !photos.files.length) { error.textContent = t("need_evidence"); return; }
    const payload = {};
    if (reason && reason.value.trim()) payload.reason = reason.value.trim();
    if (summary && summary.value.trim()) payload.summary = summary.value.trim();
    if (lead && lead.value) {
      payload.lead_department = lead.value;
      payload.co_departments = [...co.querySelectorAll("input:checked")].map((x) => x.value).filter((x) => x !== lead.value);
    }
    if (until && until.value) payload.until = new Date(until.value).toISOString();
    if (note.value.trim()) payload.note = note.value.trim();
    submit.disabled = true;
    try {
      await takeStep(c, action, payload, photos ? [...photos.files] : [], error);
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

async function uploadEvidence(file) {
  const res = await fetch(`${API}/evidence`, {
    method: "POST",
    headers: { Authorization: `Bearer ${state.token}`, "Content-Type": file.type || "application/octet-stream" },
    body: file,
  });
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = (await res.json()).detail; } catch (_) { /* not JSON */ }
    throw new HttpError(res.status, typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return (await res.json()).sha256;
}

async function takeStep(c, action, payload, files, error) {
  try {
    if (files.length) {
      error.textContent = t("uploading");
      payload.photos = [];
      for (const f of files) payload.photos.push(await uploadEvidence(f));
      error.textContent = "";
    }
    await api(`/cases/${c.event_id}/steps`, {
      method: "POST", body: { action, expected_version: c.version, payload },
    });
  } catch (err) {
    if (err.status === 409 && /version|changed/i.test(err.message)) {
      await afterStep(c.event_id);
      const el = document.querySelector(".c-error");
      if (el) el.textContent = `${t("case_changed")} (${err.message})`;
      return;
    }
    error.textContent = `${t("error")}: ${err.message}`;
    return;
  }
  await afterStep(c.event_id);
}

// -- case handling figures (Longgang 8.6): GET /cases/metrics ---------------------------------

async function loadCaseMetrics() {
  const by = $("cm-by").value;
  const q = new URLSearchParams({ by });
  const days = Number($("cm-days").value);
  // the period's start on the case clock (learnSkew), as the server counts registrations
  if (days) q.set("since", new Date(Date.now() + (state.caseSkew || 0) - days * 86400000).toISOString());
  let data;
  try {
    data = await api(`/cases/metrics?${q}`);
    $("cm-error").textContent = "";
  } catch (err) {
    $("cm-error").textContent = `${t("cm_unavailable")}: ${err.message}`;
    $("cm-rows").replaceChildren();
    return;
  }
  $("cm-asof").textContent = `${t("h_asof")} ${fmtTime(data.at || data.as_of)}`;
  const name = (key) => {
    if (by === "department") { const d = state.departments.get(key); return d ? `${d[state.lang]} (${key})` : key; }
    if (by === "community") { const p = state.places.get(key); return p ? `${p[state.lang] || p.zh} (${key})` : key; }
    return key;
  };
  const row = (g, label, cls) => h("tr", { class: cls, "data-key": g.key ?? "" },
    h("td", { text: label }),
    h("td", { text: g.registered ?? "—" }),
    h("td", { text: g.closed ?? "—" }),
    h("td", { class: "rate", text: pct(g.handling_rate) }),
    h("td", { class: "on-time", text: pct(g.on_time_rate) }),
    h("td", { class: "first-time", text: pct(g.first_time_rate) }),
    h("td", { class: "not-handled", text: g.not_handled ?? "—" }),
    h("td", { class: g.overdue ? "overdue" : "", text: g.overdue ?? "—" }));
  const groups = data.groups || data.items || [];
  const rows = groups.map((g) => row(g, name(g.key), ""));
  if (data.total) rows.push(row(data.total, t("h_total"), "total"));
  $("cm-rows").replaceChildren(...rows);
}

// -- devices ----------------------------------------------------------------------------------

async function loadDevices() {
  let data;
  try { data = await api("/devices"); } catch (_) { return; }
  $("device-counts").textContent = `${t("online")} ${data.online} · ${t("offline_state")} ${data.offline} · ${t("unknown")} ${data.unknown}`;
  $("device-rows").replaceChildren(...data.items.map((d) => {
    const hl = d.health || {};
    const health = [
      hl.fps != null ? `${hl.fps} fps` : null,
      hl.inference_ms != null ? `${hl.inference_ms} ms` : null,
      hl.outbox_depth != null ? `outbox ${hl.outbox_depth}` : null,
      hl.version ? `v${hl.version}` : null,
    ].filter(Boolean).join(" · ");
    const stateKey = d.state === "offline" ? "offline_state" : d.state;
    return h("tr", { "data-device-id": d.device_id },
      h("td", { text: d.device_id }),
      h("td", { text: d.kind ? t(d.kind) : "—" }),
      h("td", {}, h("span", { class: `state ${d.state}`, text: t(stateKey) + (d.state_reason ? ` (${d.state_reason})` : "") })),
      h("td", { text: ago(d.last_seen), title: fmtTime(d.last_seen) }),
      h("td", { text: d.grid_code || "—" }),
      h("td", { text: health || "—" }),
      h("td", { text: d.alerts_total }),
      h("td", { text: d.rejected_total }));
  }));
}

// -- handling (Longgang 8.6) ------------------------------------------------------------------

function pct(rate) { return rate == null ? "—" : `${Math.round(rate * 100)}%`; }

function duration(seconds) {
  if (seconds == null) return "—";
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

async function loadHandling() {
  loadCaseMetrics();
  let data;
  try { data = await api(`/stats/handling?by=${encodeURIComponent($("h-by").value)}`); } catch (_) { return; }
  $("handling-asof").textContent = `${t("h_asof")} ${fmtTime(data.as_of)}`;
  const row = (g, label, cls) => h("tr", { class: cls, "data-key": g.key },
    h("td", { text: label }),
    h("td", { text: g.registered }),
    h("td", { text: g.closed }),
    h("td", { class: "rate", text: pct(g.handling_rate) }),
    h("td", { class: "on-time", text: pct(g.on_time_rate) }),
    h("td", { text: g.open }),
    h("td", { class: g.overdue ? "overdue" : "", text: g.overdue }),
    h("td", { text: duration(g.median_close_s) }));
  const label = (g) => {
    const names = $("h-by").value === "department" ? state.departments
      : $("h-by").value === "type" ? state.types : state.places;
    const n = names.get(g.key);
    return n ? `${n[state.lang] || n.zh} (${g.key})` : `${g.name} (${g.key})`;
  };
  $("handling-rows").replaceChildren(
    ...data.groups.map((g) => row(g, label(g), "")),
    row(data.total, t("h_total"), "total"));
}

function showTab(tab) {
  state.tab = tab;
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === tab);
  $("events-view").hidden = tab !== "events";
  $("devices-view").hidden = tab !== "devices";
  $("handling-view").hidden = tab !== "handling";
  $("cases-view").hidden = tab !== "cases";
  clearInterval(state.deviceTimer);
  if (tab === "devices") {
    loadDevices();
    state.deviceTimer = setInterval(loadDevices, 10000);
  } else if (tab === "handling") {
    loadHandling();
    state.deviceTimer = setInterval(loadHandling, 30000);
  } else if (tab === "cases") {
    loadInbox();
    if (state.caseId) openCase(state.caseId);
    state.deviceTimer = setInterval(loadInbox, 15000);
  } else {
    refit();
  }
}

// -- wiring -----------------------------------------------------------------------------------

function init() {
  $("login-form").addEventListener("submit", login);
  $("logout").onclick = logout;
  $("lang").onclick = () => {
    state.lang = state.lang === "zh" ? "en" : "zh";
    localStorage.setItem("cwg.lang", state.lang);
    applyLang();
  };
  for (const b of document.querySelectorAll(".tab")) b.onclick = () => showTab(b.dataset.tab);
  $("filters").addEventListener("change", () => { loadEvents(true).catch(() => {}); drawMap(); });
  $("more").onclick = () => loadEvents(false);
  $("h-by").addEventListener("change", () => loadHandling());
  $("cm-by").addEventListener("change", () => loadCaseMetrics());
  $("cm-days").addEventListener("change", () => loadCaseMetrics());
  for (const b of document.querySelectorAll("#boxes .box")) {
    b.onclick = () => {
      state.box = b.dataset.box;
      for (const x of document.querySelectorAll("#boxes .box")) x.classList.toggle("active", x === b);
      loadInbox();
    };
  }
  $("d-close").onclick = () => {
    $("detail").hidden = true;
    state.selected = null;
    for (const el of document.querySelectorAll(".selected")) el.classList.remove("selected");
    refit();
  };
  setupMapControls();
  applyLang();
  setInterval(() => { if (state.operator && state.tab === "events") renderList(); }, 30000);
  setInterval(tickCountdowns, 1000);
  if (state.token) start();
}

init();
