// Pricing: how the organization's `_llm` events without `_cost` are priced (the catalogue, a
// markup, its own per-model prices), the catalogue in force and the models left unpriced.
import { fmt, h, message, section, table } from "./dom.js";

export async function pricing(ctx) {
  const settings = await ctx.call("/v1/pricing/settings");
  const status = h("div");
  const save = async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    // A PUT is the whole: the overrides are sent back as they are.
    const body = { catalog: form.get("catalog") === "on", markup_percent: form.get("markup_percent") || "0", overrides: settings.overrides };
    try {
      await ctx.call("/v1/pricing/settings", { method: "PUT", body });
      ctx.refresh();
    } catch (error) {
      status.replaceChildren(message(error.message));
    }
  };
  const overrides = Object.entries(settings.overrides);
  return [
    h("h1", { text: "Pricing" }),
    h(
      "dl",
      { class: "facts" },
      [
        ["catalogue", settings.catalog ? "on" : "off"],
        ["markup", `${settings.markup_percent}%`],
        ["catalogue version", settings.catalog_version],
        ["set", settings.modified_at ? fmt.time(settings.modified_at) : "never: nothing is priced"],
      ].map(([k, v]) => [h("dt", { text: k }), h("dd", { dataset: { fact: k.replace(" ", "_") }, text: v })]),
    ),
    section(
      "Settings",
      h(
        "form",
        { class: "inline", onsubmit: save, id: "pricing-settings" },
        h("label", {}, h("input", { type: "checkbox", name: "catalog", checked: settings.catalog }), " price from the catalogue"),
        h("label", {}, "markup % ", h("input", { name: "markup_percent", value: String(settings.markup_percent), inputmode: "decimal", size: 6 })),
        h("button", { type: "submit", text: "Save" }),
        status,
      ),
    ),
    section(
      "Own prices (cents per token)",
      table(
        [
          ["Model", ([model]) => model],
          ["Input", ([, p]) => p.input],
          ["Cached input", ([, p]) => p.cached_input ?? p.input],
          ["Output", ([, p]) => p.output],
        ],
        overrides,
        { empty: "None: set them with PUT /v1/pricing/settings (overrides)." },
      ),
    ),
    section(
      "Not priced since this server started",
      table(
        [
          ["Model", (u) => u.model],
          ["Events", (u) => fmt.number(u.events)],
        ],
        settings.unpriced_models,
        { empty: "Every _llm event without _cost was priced." },
      ),
    ),
  ];
}
