// Operations: costs, the forwarder (backlog, last error, quarantine with resend), the lakehouse
// export, dead letters (Kafka mode), alerts and webhook deliveries.
import { ApiError } from "./api.js";
import { barChart } from "./chart.js";
import { fill, fmt, h, lastWins, link, message, section, table } from "./dom.js";

const DAYS_30 = 30 * 86400e3;

function costKey(key) {
  if ("customer_id" in key) return key.external_customer_id || key.customer_id || "(no customer)";
  return [key.vendor, key.model].filter(Boolean).join(" / ") || "(no model)";
}

export async function costs(ctx) {
  const by = h("select", { name: "group_by", "aria-label": "Group by" }, ["customer", "model"].map((v) => h("option", { value: v, text: `by ${v}` })));
  const area = h("div");
  const draw = lastWins(async (current) => {
    const end = new Date();
    const params = { start_timestamp: new Date(end - DAYS_30).toISOString(), end_timestamp: end.toISOString(), limit: 20 };
    params.group_by = by.value === "model" ? ["vendor", "model"] : "customer";
    const found = await ctx.call("/v1/costs/", { params });
    const groups = found.groups;
    if (!current()) return;
    fill(
      area,
      h("p", { text: `Total ${found.total.amount} cents over ${fmt.number(found.total.events)} events in the last 30 days.` }),
      groups.length
        ? barChart({ labels: groups.map((g) => costKey(g.key)), series: [{ name: "cost (cents)", values: groups.map((g) => Number(g.amount)), class: "cost" }], caption: `Cost by ${by.value}, highest first` })
        : null,
      table(
        [
          [by.value === "model" ? "Vendor / model" : "Customer", (g) => (g.key.customer_id ? link(`#/customers/${g.key.customer_id}`, costKey(g.key)) : costKey(g.key))],
          ["Amount (cents)", (g) => g.amount, "num"],
          ["Events", (g) => fmt.number(g.events), "num"],
        ],
        groups,
        { empty: "No event with a cost (_cost) in the last 30 days." },
      ),
    );
  });
  by.addEventListener("change", () => draw().catch((error) => area.replaceChildren(message(error.message))));
  await draw();
  return [h("h1", { text: "Costs" }), h("div", { class: "controls" }, by), area];
}

export async function forwarder(ctx) {
  let status;
  try {
    status = await ctx.call("/v1/forwarder/");
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 404) throw error;
    return [h("h1", { text: "Forwarder" }), message("This organization's events are not forwarded upstream (see meterline up --upstream-url).", "info")];
  }
  const quarantine = await ctx.call("/v1/forwarder/quarantine");
  const resend = async (item, button) => {
    button.disabled = true;
    try {
      const done = await ctx.call(`/v1/forwarder/quarantine/${item.seq}/resend`, { method: "POST" });
      button.replaceWith(h("span", { class: "result", text: done.result }));
    } catch (error) {
      button.replaceWith(message(error.message));
    }
  };
  return [
    h("h1", { text: "Forwarder" }),
    h(
      "dl",
      { class: "facts" },
      ["mode", "backlog", "sent", "retried", "quarantined"].map((k) => [h("dt", { text: k }), h("dd", { dataset: { fact: k }, text: typeof status[k] === "number" ? fmt.number(status[k]) : status[k] })]),
      h("dt", { text: "last error" }),
      h("dd", { class: "error-text", text: status.last_error || "none" }),
    ),
    section(
      "Quarantine",
      table(
        [
          ["Seq", (q) => q.seq],
          ["Event", (q) => `${q.event.name} (${q.event.external_id || "no external id"})`],
          ["Reason", (q) => q.reason],
          ["", (q) => { const b = h("button", { type: "button", text: "Resend" }); b.addEventListener("click", () => resend(q, b)); return b; }],
        ],
        quarantine.items,
        { empty: "Nothing is quarantined." },
      ),
    ),
  ];
}

export async function exported(ctx) {
  let status;
  try {
    status = await ctx.call("/v1/export/");
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 404) throw error;
    return [h("h1", { text: "Export" }), message("This deployment exports no events to a lakehouse table (see meterline up --export-to).", "info")];
  }
  const facts = [
    ["table", `${status.table} (Delta Lake)`],
    ["partition", status.partition],
    ["exporting", status.exporting ? "yes (this core leads)" : "no: the leader exports"],
    ["lag", status.lag_seconds ? `${fmt.number(status.lag_seconds)} s` : "none"],
    ["last commit", status.last_commit_at ? fmt.time(status.last_commit_at) : "none since this core started"],
  ];
  return [
    h("h1", { text: "Export" }),
    status.failing ? message(`The export is failing and retrying: ${status.last_error}`) : null,
    h(
      "dl",
      { class: "facts" },
      facts.map(([k, v]) => [h("dt", { text: k }), h("dd", { dataset: { fact: k.replace(" ", "_") }, text: v })]),
      h("dt", { text: "last error" }),
      h("dd", { class: "error-text", text: status.last_error || "none" }),
    ),
  ];
}

export async function deadLetters(ctx) {
  const found = await ctx.call("/v1/dead-letters/", { params: { limit: 50 } });
  const title = h("h1", { text: "Dead letters" });
  if (!found.kafka) {
    return [title, message("Dead letters exist in Kafka mode only: this server runs the embedded pipeline, which refuses bad events at ingest with a 422.", "info")];
  }
  // Counted by the consumer since the core started (null: this process consumes no topic).
  const counts = found.counts;
  return [
    title,
    counts
      ? h(
          "dl",
          { class: "facts" },
          [["applied", counts.applied], ["dead_lettered", counts.dead_lettered]].map(([k, v]) => [h("dt", { text: k.replace("_", "-") }), h("dd", { dataset: { fact: k }, text: fmt.number(v) })]),
          h("dt", { text: "latest reasons" }),
          h("dd", { dataset: { fact: "latest_reasons" }, class: "error-text" }, counts.latest_reasons.length ? counts.latest_reasons.map((r) => h("div", { text: `${fmt.time(r.timestamp)}: ${r.reason}` })) : "none"),
        )
      : null,
    found.complete ? null : message("Only the newest records of the dead-letter topic were read: older dead letters may exist.", "info"),
    table(
      [
        ["Time", (d) => fmt.time(d.timestamp)],
        ["Reason", (d) => d.reason],
        ["From", (d) => `${d.origin.topic}[${d.origin.partition}]@${d.origin.offset}${d.origin.row === null ? "" : ` row ${d.origin.row}`}`],
        ["Record", (d) => h("code", { text: d.value_encoding === "utf-8" ? (d.value || "").slice(0, 300) : `${fmt.number(d.value_bytes)} bytes (binary)` })],
      ],
      found.items,
      { empty: "No dead letter: every record of this organization was applied." },
    ),
  ];
}

export async function alerts(ctx) {
  const [found, meters, endpoints, deliveries] = await Promise.all([
    ctx.call("/v1/meter-alerts/", { params: { limit: 100 } }),
    ctx.call("/v1/meters/", { params: { limit: 100 } }),
    ctx.call("/v1/webhooks/endpoints", { params: { limit: 100 } }),
    ctx.call("/v1/webhooks/deliveries", { params: { limit: 50 } }),
  ]);
  const names = new Map(meters.items.map((m) => [m.id, m.name]));
  const endpointUrls = new Map(endpoints.items.map((e) => [e.id, e.url]));
  return [
    h("h1", { text: "Alerts and webhooks" }),
    section(
      "Alerts",
      table(
        [
          ["Meter", (a) => link(`#/meters/${a.meter_id}`, names.get(a.meter_id) || a.meter_id)],
          ["Customer", (a) => (a.customer_id ? link(`#/customers/${a.customer_id}`, a.customer_id) : "every customer")],
          ["Fires when", (a) => `${a.metric} ${a.operator === "gte" ? "≥" : "≤"} ${fmt.number(a.threshold)}`],
          ["External id", (a) => a.external_id],
          ["Created", (a) => fmt.time(a.created_at)],
        ],
        found.items,
        { empty: "No alert." },
      ),
    ),
    section(
      "Endpoints",
      table(
        [
          ["URL", (e) => e.url],
          ["Events", (e) => e.events.join(", ")],
          ["Enabled", (e) => (e.enabled ? "yes" : `no: ${e.disabled_reason || ""}`)],
        ],
        endpoints.items,
        { empty: "No webhook endpoint." },
      ),
    ),
    section(
      "Deliveries",
      table(
        [
          ["Time", (d) => fmt.time(d.created_at)],
          ["Event", (d) => d.webhook_event.type],
          ["Endpoint", (d) => endpointUrls.get(d.endpoint_id) || d.endpoint_id],
          ["Attempt", (d) => d.attempt, "num"],
          ["HTTP", (d) => d.http_code ?? "no answer", "num"],
          ["Result", (d) => (d.succeeded ? "delivered" : "failed")],
          ["Latency (ms)", (d) => fmt.number(d.latency_ms), "num"],
        ],
        deliveries.items,
        { empty: "No delivery yet." },
      ),
    ),
  ];
}
