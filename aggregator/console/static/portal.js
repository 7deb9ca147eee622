// The customer's usage page (Polar's customer portal usage view): a customer session token
// (POST /v1/customer-sessions/) given in the URL fragment (#token=…, never sent to a server) or
// pasted, kept in this tab's session storage; it reads only that customer's meters.
import { ApiError, Session, api } from "./api.js";
import { barChart } from "./chart.js";
import { fill, fmt, h, message, table } from "./dom.js";

const session = new Session("meterline.portal");
const main = document.getElementById("page");

function takeFragmentToken() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (token) {
    session.token = token;
    history.replaceState(null, "", location.pathname); // not left in the address bar
  }
}

async function show(notice) {
  if (!session.token) return ask(notice);
  try {
    const found = await api(session, "/v1/customer-portal/meters/", { params: { limit: 100, sorting: "meter_name" } });
    const items = found.items;
    fill(
      main,
      h("h1", { text: "Your usage" }),
      items.length
        ? barChart({
            labels: items.map((cm) => cm.meter.name),
            series: [
              { name: "consumed", values: items.map((cm) => cm.consumed_units), class: "consumed" },
              { name: "credited", values: items.map((cm) => cm.credited_units), class: "credited" },
            ],
            caption: "Consumed and credited units per meter, since each meter's last reset",
          })
        : null,
      table(
        [
          ["Meter", (cm) => cm.meter.name],
          ["Consumed", (cm) => fmt.number(cm.consumed_units), "num"],
          ["Credited", (cm) => fmt.number(cm.credited_units), "num"],
          ["Balance", (cm) => fmt.number(cm.balance), "num balance"],
          ["Updated", (cm) => fmt.time(cm.modified_at)],
        ],
        items,
        { empty: "No usage yet.", key: (cm) => cm.meter.id },
      ),
      h("button", { type: "button", id: "forget", text: "Forget this session", onclick: () => forget() }),
    );
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return forget(error.message);
    main.replaceChildren(message(error.message));
  }
}

function forget(notice) {
  session.token = null;
  ask(notice);
}

function ask(notice) {
  const input = h("input", { type: "password", name: "token", required: true, autocomplete: "off", placeholder: "mlt_cst_…", "aria-label": "Customer session token" });
  const submit = (event) => {
    event.preventDefault();
    session.token = input.value.trim();
    show();
  };
  fill(
    main,
    h(
      "form",
      { class: "login", onsubmit: submit },
      h("h1", { text: "Your usage" }),
      h("p", { text: "Open the link you were given, or paste its customer session token." }),
      input,
      h("button", { type: "submit", text: "Show my usage" }),
      notice ? message(notice) : null,
    ),
  );
}

takeFragmentToken();
window.addEventListener("hashchange", () => {
  takeFragmentToken();
  show();
});
show();
