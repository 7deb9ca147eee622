// Customers: search; one customer's meters (balances pushed live by the server) and recent
// events (read again as the same pushes come); one customer meter's history (consumption and
// credits per period, resets marked) and its credit grants (what remains of each, expiries).
import { follow } from "./api.js";
import { fmt, h, link, message, section, table } from "./dom.js";
import { byDimension, periodOf, usage } from "./meters.js";

export async function list(ctx) {
  const results = h("div");
  const search = async (query) => {
    const found = await ctx.call("/v1/customers/", { params: { query, limit: 50 } });
    results.replaceChildren(
      table(
        [
          ["Name", (c) => link(`#/customers/${c.id}`, c.name || c.email || c.external_id || c.id)],
          ["Email", (c) => c.email],
          ["External id", (c) => c.external_id],
          ["First event", (c) => fmt.time(c.first_user_event_at)],
          ["Created", (c) => fmt.time(c.created_at)],
        ],
        found.items,
        { empty: "No customer matches." },
      ),
    );
  };
  const input = h("input", { type: "search", name: "query", placeholder: "name, email or external id", "aria-label": "Search customers" });
  const submit = (event) => {
    event.preventDefault();
    search(input.value.trim()).catch((error) => results.replaceChildren(message(error.message)));
  };
  await search("");
  return [h("h1", { text: "Customers" }), h("form", { class: "inline", onsubmit: submit }, input, h("button", { type: "submit", text: "Search" })), results];
}

const BALANCE_COLUMNS = [
  ["Consumed", (cm) => fmt.number(cm.consumed_units), "num consumed"],
  ["Credited", (cm) => fmt.number(cm.credited_units), "num credited"],
  ["Balance", (cm) => fmt.number(cm.balance), "num balance"],
  ["Held", (cm) => fmt.number(cm.held_units), "num held"],
  ["Available", (cm) => fmt.number(cm.available), "num available"],
];

// Keeps `rows` (customer meters keyed by meter id) current from the live stream, calling
// `render` after each change and `changed` after each push (what else the change touched, to
// read again); the returned badge says whether the stream is up.
function live(ctx, params, rows, render, reload, changed = () => {}) {
  const badge = h("span", { class: "live", dataset: { state: "connecting" }, text: "connecting" });
  const state = (name) => {
    badge.dataset.state = name;
    badge.textContent = name;
  };
  follow(
    ctx.session,
    "/v1/customer-meters/stream",
    params,
    (event, data) => {
      if (["open", "customer_meter", "reset"].includes(event)) changed();
      if (event === "open") {
        state("live");
        reload(); // what changed while the stream was down
      } else if (event === "customer_meter") {
        const known = rows.get(data.meter_id); // pushes carry figures, not the meter's name
        if (!known) return reload();
        rows.set(data.meter_id, { ...known, ...data });
        render(data.meter_id);
      } else if (event === "reset") reload();
      else if (event === "closed") state("reconnecting");
      else if (event === "unauthorized") ctx.signOut(data.message);
    },
    ctx.signal,
  );
  return badge;
}

export async function detail(ctx, id) {
  const customer = await ctx.call(`/v1/customers/${id}`);
  const rows = new Map();
  const columns = [["Meter", (cm) => link(`#/customers/${id}/meters/${cm.meter_id}`, cm.meter.name)], ...BALANCE_COLUMNS, ["Changed", (cm) => fmt.time(cm.modified_at)]];
  const holder = h("div", { id: "customer-meters" });
  const render = (changed) => {
    const shown = table(columns, [...rows.values()], { empty: "No usage or credits yet.", key: (cm) => cm.meter_id });
    holder.replaceChildren(shown);
    holder.querySelector(`tr[data-key="${changed}"]`)?.classList.add("changed");
  };
  const reload = async () => {
    const found = await ctx.call("/v1/customer-meters/", { params: { customer_id: id, limit: 100 } });
    rows.clear();
    for (const cm of found.items) rows.set(cm.meter_id, cm);
    render();
  };
  await reload();
  // The events that changed a balance come with its push: the list is read again then (at most
  // one read at a time, and one more for the pushes that came during it).
  const recent = h("div", { id: "recent-events" });
  const readEvents = async () => {
    const events = await ctx.call("/v1/events/", { params: { customer_id: id, limit: 20, sorting: "-timestamp" } });
    recent.replaceChildren(
      table(
        [
          ["Time", (e) => fmt.time(e.timestamp)],
          ["Name", (e) => e.name],
          ["Source", (e) => e.source],
          ["Metadata", (e) => h("code", { text: JSON.stringify(e.metadata) })],
        ],
        events.items,
        { empty: "No events yet.", key: (e) => e.id },
      ),
    );
  };
  await readEvents();
  const badge = live(ctx, { customer_id: id }, rows, render, () => reload().catch(() => {}), oneAtATime(readEvents));
  return [
    h("h1", { text: `Customer: ${customer.name || customer.email || customer.external_id || customer.id}` }),
    h("dl", { class: "facts" }, fact("Email", customer.email), fact("External id", customer.external_id), fact("Id", customer.id)),
    section("Meters", h("p", { class: "hint" }, badge, " balances update as the server commits changes"), holder),
    section("Recent events", h("p", { class: "hint", text: "read again as the balances above change" }), recent),
  ];
}

// `load()` now, or, while a load runs, once more after it (however often asked meanwhile); a
// failed load waits for the next change.
function oneAtATime(load) {
  let running = null;
  let again = false;
  const run = () => {
    if (running) {
      again = true;
      return;
    }
    running = load()
      .catch(() => {})
      .finally(() => {
        running = null;
        if (again) {
          again = false;
          run();
        }
      });
  };
  return run;
}

function fact(name, value) {
  return [h("dt", { text: name }), h("dd", { text: value ?? "—" })];
}

const GRANT_COLUMNS = [
  ["Priority", (g) => fmt.number(g.priority), "num"],
  ["Expires", (g) => (g.expires_at ? fmt.time(g.expires_at) : "never")],
  ["Rollover", (g) => (g.rollover ? "yes" : "no")],
  ["Units", (g) => fmt.number(g.units), "num"],
  ["Remaining", (g) => fmt.number(g.remaining_units), "num"],
  ["Status", (g) => (g.expired ? `expired (${fmt.number(g.expired_units)} unused)` : "active")],
];

export async function history(ctx, customerId, meterId) {
  const [customer, meter] = await Promise.all([ctx.call(`/v1/customers/${customerId}`), ctx.call(`/v1/meters/${meterId}`)]);
  const rows = new Map();
  const facts = h("div", { id: "balance" });
  const grants = h("div", { id: "grants" });
  const render = () => {
    const cm = rows.get(meterId);
    facts.replaceChildren(cm ? table(BALANCE_COLUMNS, [cm], { key: (c) => c.meter_id }) : message("No usage or credits yet.", "info"));
  };
  const reload = async () => {
    const found = await ctx.call("/v1/customer-meters/", { params: { customer_id: customerId, meter_id: meterId } });
    rows.clear();
    for (const cm of found.items) rows.set(cm.meter_id, cm);
    render();
    // The grants in burn order's terms (meterline's own read), refreshed with the balance.
    const cm = found.items[0];
    const listed = cm ? (await ctx.call(`/v1/customer-meters/${cm.id}/grants`)).items : [];
    grants.replaceChildren(table(GRANT_COLUMNS, listed, { empty: "No credit grants in this window.", key: (g) => g.id }));
  };
  await reload();
  const badge = live(ctx, { customer_id: customerId, meter_id: meterId }, rows, render, () => reload().catch(() => {}));
  // Credits and resets are system events of the customer naming the meter.
  const extra = async (params, periodStarts) => {
    const found = await ctx.call("/v1/events/", {
      params: { customer_id: customerId, source: "system", "metadata[meter_id]": meterId, start_timestamp: params.start_timestamp, end_timestamp: params.end_timestamp, limit: 100 },
    });
    const credited = periodStarts.map(() => 0);
    const marks = [];
    for (const event of found.items) {
      const index = periodOf(periodStarts, event.timestamp);
      if (index < 0) continue;
      if (event.name === "meter.credited") credited[index] += event.metadata.units;
      if (event.name === "meter.credit_expired") credited[index] -= event.metadata.units;
      if (event.name === "meter.reset") marks.push({ index, kind: "reset", text: `reset ${fmt.time(event.timestamp)}` });
    }
    return { series: [{ name: "credited", values: credited, class: "credited" }], marks };
  };
  const customerMeterId = rows.get(meterId)?.id;
  return [
    h("h1", { text: `${meter.name} for ${customer.name || customer.email || customer.external_id || customer.id}` }),
    section("Balance", h("p", { class: "hint" }, badge), facts),
    section("Grants", h("p", { class: "hint", text: "lower priority burns first, then the earliest expiry" }), grants),
    section("History", await usage(ctx, meter, { customerId, extra })),
    meter.dimensions?.length ? section("By dimension", await byDimension(ctx, meter, { customerId, customerMeterId })) : null,
  ];
}
