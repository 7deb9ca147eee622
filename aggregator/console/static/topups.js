// Top-ups: the organization's top-up rules (made and deleted here) and the top-ups they made.
import { fmt, h, link, message, section, table } from "./dom.js";

const PERIODS = ["day", "week", "month"];
const TOPPABLE = new Set(["count", "sum"]); // meters whose consumption a credit offsets

export async function page(ctx) {
  const [rules, made, meters] = await Promise.all([
    ctx.call("/v1/top-up-rules/", { params: { limit: 100 } }),
    ctx.call("/v1/top-ups/", { params: { limit: 50 } }),
    ctx.call("/v1/meters/", { params: { limit: 100, is_archived: false } }),
  ]);
  const names = new Map(meters.items.map((m) => [m.id, m.name]));
  const meterLink = (id) => link(`#/meters/${id}`, names.get(id) || id);
  const status = h("div");
  const remove = async (rule, button) => {
    button.disabled = true;
    try {
      await ctx.call(`/v1/top-up-rules/${rule.id}`, { method: "DELETE" });
      ctx.refresh();
    } catch (error) {
      button.disabled = false;
      status.replaceChildren(message(error.message));
    }
  };
  return [
    h("h1", { text: "Top-ups" }),
    section(
      "Rules",
      status,
      table(
        [
          ["Meter", (r) => meterLink(r.meter_id)],
          ["Customer", (r) => (r.customer_id ? link(`#/customers/${r.customer_id}`, r.customer_id) : "every customer")],
          ["Tops up", (r) => `+${fmt.number(r.units)} when below ${fmt.number(r.threshold)}`],
          ["At most", (r) => `${r.max_per_period} a ${r.period}`],
          ["Grant", (r) => `priority ${r.priority}, ${r.expires_in_days ? `expires after ${r.expires_in_days} days` : "never expires"}`],
          ["Last refused", (r) => (r.refused_reason ? `${fmt.time(r.refused_at)}: ${r.refused_reason}` : "—")],
          ["", (r) => { const b = h("button", { type: "button", text: "Delete" }); b.addEventListener("click", () => remove(r, b)); return b; }],
        ],
        rules.items,
        { empty: "No top-up rule.", key: (r) => r.id },
      ),
    ),
    createForm(ctx, meters.items.filter((m) => TOPPABLE.has(m.aggregation.func))),
    section(
      "Recent top-ups",
      table(
        [
          ["Time", (t) => fmt.time(t.created_at)],
          ["Meter", (t) => meterLink(t.meter_id)],
          ["Customer", (t) => link(`#/customers/${t.customer_id}`, t.customer_id)],
          ["Units", (t) => fmt.number(t.units), "num"],
          ["Period", (t) => `${t.period} (#${t.number})`],
          ["Balance before", (t) => fmt.number(t.balance_before), "num"],
        ],
        made.items,
        { empty: "No top-up yet." },
      ),
    ),
  ];
}

function createForm(ctx, meters) {
  const status = h("div");
  const meter = h("select", { name: "meter_id", "aria-label": "Meter", required: true }, meters.map((m) => h("option", { value: m.id, text: m.name })));
  const period = h("select", { name: "period", "aria-label": "Period" }, PERIODS.map((p) => h("option", { value: p, text: p })));
  const number = (name, props = {}) => h("input", { name, type: "number", ...props });
  const submit = async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const customer = form.get("external_customer_id").trim();
    const expires = form.get("expires_in_days").trim();
    const body = {
      meter_id: form.get("meter_id"),
      threshold: Number(form.get("threshold")),
      units: Number(form.get("units")),
      max_per_period: Number(form.get("max_per_period")),
      period: form.get("period"),
      priority: Number(form.get("priority")),
      ...(customer ? { external_customer_id: customer } : {}),
      ...(expires ? { expires_in_days: Number(expires) } : {}),
    };
    try {
      await ctx.call("/v1/top-up-rules/", { method: "POST", body });
      ctx.refresh();
    } catch (error) {
      status.replaceChildren(message(error.message));
    }
  };
  return section(
    "Create a rule",
    h(
      "form",
      { class: "inline", onsubmit: submit, id: "create-top-up-rule" },
      h("label", {}, "Meter ", meter),
      h("label", {}, "Customer (external id) ", h("input", { name: "external_customer_id", placeholder: "every customer" })),
      h("label", {}, "When below ", number("threshold", { required: true, step: "any" })),
      h("label", {}, "credit ", number("units", { required: true, min: 1 })),
      h("label", {}, "at most ", number("max_per_period", { required: true, min: 1, value: 1 })),
      h("label", {}, "times a ", period),
      h("label", {}, "priority ", number("priority", { min: 0, max: 255, value: 100 })),
      h("label", {}, "expiring after (days) ", number("expires_in_days", { min: 1, placeholder: "never" })),
      h("button", { type: "submit", text: "Create" }),
      status,
    ),
  );
}
