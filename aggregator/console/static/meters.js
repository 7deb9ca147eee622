// Meters: the list with a create form, and one meter's definition, backfill and usage chart.
import { barChart } from "./chart.js";
import { LOCAL_ZONE, fmt, h, lastWins, link, message, section, table } from "./dom.js";

const FUNCS = ["count", "sum", "avg", "min", "max", "unique", "latest", "integral"];
const PER = ["hour", "day", "minute", "second"]; // an integral's unit of time
const RANGES = { hour: 48 * 3600e3, day: 30 * 86400e3 }; // what each interval's chart spans

export function aggregation(a) {
  if (a.func === "count") return "count";
  return a.func === "integral" ? `integral(${a.property}) per ${a.per}` : `${a.func}(${a.property})`;
}

function aggregationOf(form) {
  const func = form.get("func");
  if (func === "count") return { func };
  const property = form.get("property").trim();
  return func === "integral" ? { func, property, per: form.get("per") } : { func, property };
}

function backfill(meter) {
  const b = meter.backfill;
  return b.status === "done" ? "done" : `running ${fmt.number(b.events_done)} / ${fmt.number(b.events_total)}`;
}

export async function list(ctx) {
  const found = await ctx.call("/v1/meters/", { params: { limit: 100 } });
  return [
    h("h1", { text: "Meters" }),
    table(
      [
        ["Name", (m) => link(`#/meters/${m.id}`, m.name)],
        ["Aggregation", (m) => aggregation(m.aggregation)],
        ["Filter", (m) => `${m.filter.clauses.length} clause(s), ${m.filter.conjunction}`],
        ["Backfill", backfill],
        ["Created", (m) => fmt.time(m.created_at)],
      ],
      found.items,
      { empty: "No meter yet: create one below." },
    ),
    createForm(ctx),
  ];
}

function createForm(ctx) {
  const status = h("div");
  const func = h("select", { name: "func", "aria-label": "Aggregation" }, FUNCS.map((f) => h("option", { value: f, text: f })));
  const per = h("select", { name: "per", "aria-label": "Integrated per" }, PER.map((p) => h("option", { value: p, text: p })));
  const perLabel = h("label", { hidden: true }, "integrated per ", per);
  func.addEventListener("change", () => (perLabel.hidden = func.value !== "integral"));
  const submit = async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const name = form.get("event_name").trim();
    const body = {
      name: form.get("name").trim(),
      filter: { conjunction: "and", clauses: name ? [{ property: "name", operator: "eq", value: name }] : [] },
      aggregation: aggregationOf(form),
    };
    try {
      const meter = await ctx.call("/v1/meters/", { method: "POST", body });
      location.hash = `#/meters/${meter.id}`;
    } catch (error) {
      status.replaceChildren(message(error.message));
    }
  };
  return section(
    "Create a meter",
    h(
      "form",
      { class: "inline", onsubmit: submit, id: "create-meter" },
      h("label", {}, "Name ", h("input", { name: "name", required: true })),
      h("label", {}, "Events named ", h("input", { name: "event_name", placeholder: "any" })),
      h("label", {}, "Aggregation ", func),
      h("label", {}, "of property ", h("input", { name: "property", placeholder: "e.g. tokens" })),
      perLabel,
      h("button", { type: "submit", text: "Create" }),
      status,
    ),
  );
}

export async function detail(ctx, id) {
  const meter = await ctx.call(`/v1/meters/${id}`);
  const state = h("dd", { text: backfill(meter), id: "backfill" });
  const chart = await usage(ctx, meter);
  follow(ctx, meter, state, chart);
  return [
    h("h1", { text: `Meter: ${meter.name}` }),
    h(
      "dl",
      { class: "facts" },
      h("dt", { text: "Aggregation" }),
      h("dd", { text: aggregation(meter.aggregation) }),
      h("dt", { text: "Backfill" }),
      state,
      h("dt", { text: "Id" }),
      h("dd", { text: meter.id }),
    ),
    section("Usage", chart),
    section("Filter", h("pre", { text: fmt.json(meter.filter) })),
  ];
}

// A backfill in progress is followed until it is done, and the chart (complete only then) is
// drawn again: the page must not show "running" forever.
async function follow(ctx, meter, state, chart) {
  while (meter.backfill.status !== "done") {
    await new Promise((resolve) => setTimeout(resolve, 1000));
    if (ctx.signal.aborted) return;
    try {
      meter = await ctx.call(`/v1/meters/${meter.id}`);
    } catch {
      return; // left the page, or the server is gone: the next visit reads it again
    }
    state.textContent = backfill(meter);
  }
  if (!ctx.signal.aborted) await chart.redraw();
}

// The meter's quantities by hour or day in a timezone (of one customer with `customerId`), as a
// chart with controls; `extra(start, end, interval, zone, labels)` adds series and marks.
export async function usage(ctx, meter, { customerId, extra } = {}) {
  const interval = h("select", { name: "interval", "aria-label": "Interval" }, ["day", "hour"].map((v) => h("option", { value: v, text: `by ${v}` })));
  const zone = h("input", { name: "timezone", value: LOCAL_ZONE, "aria-label": "Timezone", size: 18 });
  const area = h("div", { class: "chart-area" });
  const draw = lastWins(async (current) => {
    const end = new Date();
    const start = new Date(end - RANGES[interval.value]);
    const params = {
      start_timestamp: start.toISOString(),
      end_timestamp: end.toISOString(),
      interval: interval.value,
      timezone: zone.value,
      customer_id: customerId,
    };
    try {
      const found = await ctx.call(`/v1/meters/${meter.id}/quantities`, { params });
      const labels = found.quantities.map((q) => label(q.timestamp, interval.value, zone.value));
      const more = extra ? await extra(params, found.quantities.map((q) => q.timestamp)) : { series: [], marks: [] };
      if (!current()) return;
      area.replaceChildren(
        barChart({
          labels,
          series: [{ name: "consumed", values: found.quantities.map((q) => q.quantity), class: "consumed" }, ...more.series],
          marks: more.marks,
          caption: `${meter.name}, ${aggregation(meter.aggregation)} by ${interval.value} in ${zone.value}; total ${fmt.number(found.total)}`,
        }),
      );
    } catch (error) {
      if (!ctx.signal.aborted && current()) area.replaceChildren(message(error.message));
    }
  });
  interval.addEventListener("change", draw);
  zone.addEventListener("change", draw);
  await draw();
  const chart = h("div", {}, h("div", { class: "controls" }, interval, h("label", {}, "Timezone ", zone)), area);
  chart.redraw = draw;
  return chart;
}

// One customer's usage of a meter by one of its dimensions (meterline's own): a stacked chart
// of the quantities by day, a group per value, and its customer meter's consumed units by
// value (`/breakdown`). Null values show as "none".
export async function byDimension(ctx, meter, { customerId, customerMeterId }) {
  const dimension = h("select", { name: "dimension", "aria-label": "Dimension" }, meter.dimensions.map((d) => h("option", { value: d, text: `by ${d}` })));
  const area = h("div", { class: "chart-area" });
  const split = h("div", { id: "breakdown" });
  const named = (value) => value ?? "none";
  const draw = lastWins(async (current) => {
    const end = new Date();
    const params = {
      start_timestamp: new Date(end - RANGES.day).toISOString(),
      end_timestamp: end.toISOString(),
      interval: "day",
      timezone: LOCAL_ZONE,
      customer_id: customerId,
      group_by: dimension.value,
    };
    try {
      const [found, breakdown] = await Promise.all([
        ctx.call(`/v1/meters/${meter.id}/quantities`, { params }),
        customerMeterId ? ctx.call(`/v1/customer-meters/${customerMeterId}/breakdown`, { params: { group_by: dimension.value } }) : null,
      ]);
      if (!current()) return;
      const series = found.groups.map((g, i) => ({
        name: named(g.dimensions[dimension.value]),
        values: g.quantities.map((q) => q.quantity),
        class: `g${i % 8}`,
      }));
      const folded = found.other_groups ? ` (${fmt.number(found.other_groups)} values in __other__)` : "";
      area.replaceChildren(
        barChart({
          labels: found.quantities.map((q) => label(q.timestamp, "day", LOCAL_ZONE)),
          series,
          stacked: true,
          caption: `${meter.name} by ${dimension.value}, by day in ${LOCAL_ZONE}; total ${fmt.number(found.total)}${folded}`,
        }),
      );
      const rows = breakdown ? breakdown.groups : [];
      split.replaceChildren(
        table([[dimension.value, (g) => named(g.dimensions[dimension.value])], ["Consumed", (g) => fmt.number(g.consumed_units), "num"]], rows, {
          empty: "No usage in this window.",
          key: (g) => named(g.dimensions[dimension.value]),
        }),
      );
    } catch (error) {
      if (!ctx.signal.aborted && current()) area.replaceChildren(message(error.message));
    }
  });
  dimension.addEventListener("change", draw);
  await draw();
  return h("div", { id: "by-dimension" }, h("div", { class: "controls" }, dimension), area, h("h3", { text: "This window's consumed units" }), split);
}

function label(iso, interval, timeZone) {
  const options = interval === "hour" ? { hour: "2-digit", minute: "2-digit", day: "numeric" } : { day: "numeric", month: "short" };
  return new Date(iso).toLocaleString("en-GB", { timeZone, ...options });
}

// The index of the period (by start) a time falls in.
export function periodOf(periodStarts, iso) {
  const at = new Date(iso).getTime();
  let found = -1;
  periodStarts.forEach((start, i) => {
    if (new Date(start).getTime() <= at) found = i;
  });
  return found;
}
