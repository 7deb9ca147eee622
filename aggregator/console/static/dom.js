// Building the page: elements, tables, numbers and times, with text always set as text (never
// as markup), so nothing an API answer holds can become markup.

// Replace `el`'s content, leaving out what is null or false (optional parts of a page).
export function fill(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

export function h(tag, props = {}, ...children) {
  const svg = ["svg", "rect", "line", "text", "g", "title", "path"].includes(tag);
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "text") el.textContent = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : value);
  }
  el.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

// columns: [label, (row) => text or node, class?]; rows: any; key: (row) => data-key.
export function table(columns, rows, { empty = "Nothing yet.", key } = {}) {
  if (!rows.length) return h("p", { class: "empty", text: empty });
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, columns.map(([label, , cls]) => h("th", { class: cls, text: label })))),
    h("tbody", {}, rows.map((row) => tableRow(columns, row, key))),
  );
}

function tableRow(columns, row, key) {
  return h(
    "tr",
    { dataset: key ? { key: key(row) } : undefined },
    columns.map(([, value, cls]) => {
      const shown = value(row);
      return h("td", { class: cls }, shown instanceof Node ? shown : String(shown ?? "—"));
    }),
  );
}

// `draw(current)` for each call, where `current()` says whether no later call has begun since:
// a draw checks it before it shows anything, so that when a control changes twice quickly the
// answer that arrives last cannot replace the one asked for last.
export function lastWins(draw) {
  let latest = 0;
  return () => {
    const mine = ++latest;
    return draw(() => mine === latest);
  };
}

export function section(title, ...children) {
  return h("section", {}, h("h2", { text: title }), ...children);
}

export function message(text, kind = "error") {
  return h("p", { class: `message ${kind}`, role: kind === "error" ? "alert" : "status", text });
}

export function link(href, text) {
  return h("a", { href, text });
}

export const fmt = {
  number(n) {
    return n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US", { maximumFractionDigits: 6 });
  },
  time(iso, timeZone) {
    return iso ? new Date(iso).toLocaleString("en-GB", { timeZone, dateStyle: "medium", timeStyle: "short" }) : "—";
  },
  json(value) {
    return JSON.stringify(value, null, 2);
  },
};

// The browser's own timezone: what the charts start in.
export const LOCAL_ZONE = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
