// The console: log in with an organization token (kept in this tab's session storage only),
// then one page per hash route. Each page is an async function of a context (`call` the API,
// `signal` aborted when the page is left) returning what to show.
import { ApiError, Session, api } from "./api.js";
import * as customers from "./customers.js";
import { fill, h, message } from "./dom.js";
import * as meters from "./meters.js";
import * as operations from "./operations.js";
import * as pricing from "./pricing.js";
import * as topups from "./topups.js";

const session = new Session("meterline.token");
const main = document.getElementById("page");
const nav = document.getElementById("nav");
const logout = document.getElementById("logout");
let leaving = null; // aborts the page shown (its requests and live stream)

const ROUTES = [
  [/^#\/meters\/([\w-]+)$/, meters.detail],
  [/^#\/customers\/([\w-]+)\/meters\/([\w-]+)$/, customers.history],
  [/^#\/customers\/([\w-]+)$/, customers.detail],
  [/^#\/customers$/, customers.list],
  [/^#\/costs$/, operations.costs],
  [/^#\/pricing$/, pricing.pricing],
  [/^#\/forwarder$/, operations.forwarder],
  [/^#\/export$/, operations.exported],
  [/^#\/dead-letters$/, operations.deadLetters],
  [/^#\/alerts$/, operations.alerts],
  [/^#\/top-ups$/, topups.page],
  [/^/, meters.list],
];

async function show() {
  leaving?.abort();
  leaving = new AbortController();
  const signal = leaving.signal;
  if (!session.token) return login();
  nav.hidden = logout.hidden = false;
  const hash = location.hash || "#/meters";
  const [pattern, page] = ROUTES.find(([p]) => p.test(hash));
  for (const a of nav.querySelectorAll("a")) a.classList.toggle("current", hash.startsWith(a.hash));
  delete main.dataset.shown;
  main.replaceChildren(h("p", { class: "loading", text: "Loading…" }));
  const ctx = {
    session,
    signal,
    call: (path, options = {}) => api(session, path, { ...options, signal }),
    refresh: show,
    signOut,
  };
  try {
    const content = await page(ctx, ...hash.match(pattern).slice(1));
    if (signal.aborted) return;
    fill(main, content);
  } catch (error) {
    if (signal.aborted) return;
    if (error instanceof ApiError && error.status === 401) return signOut(error.message);
    main.replaceChildren(message(error.message));
  }
  main.dataset.shown = hash; // what is on screen (tests wait for it)
}

function signOut(notice, kind = "error") {
  session.token = null;
  login(notice && message(notice, kind));
}

function login(notice) {
  leaving?.abort();
  nav.hidden = logout.hidden = true;
  const input = h("input", {
    type: "password",
    name: "token",
    required: true,
    autocomplete: "off",
    placeholder: "mlt_oat_…",
    "aria-label": "Organization access token",
  });
  const status = h("div", {}, notice);
  const submit = async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    try {
      await api({ token }, "/v1/meters/", { params: { limit: 1 } }); // is the token good?
    } catch (error) {
      return status.replaceChildren(message(error.message));
    }
    session.token = token;
    if (!location.hash) location.hash = "#/meters";
    show();
  };
  main.replaceChildren(
    h(
      "form",
      { class: "login", onsubmit: submit },
      h("h1", { text: "Log in" }),
      h("p", { text: "An organization access token (meterline token create --org NAME). It stays in this tab only." }),
      input,
      h("button", { type: "submit", text: "Log in" }),
      status,
    ),
  );
  input.focus();
}

logout.addEventListener("click", () => signOut("Logged out.", "info"));
window.addEventListener("hashchange", show);
show();
