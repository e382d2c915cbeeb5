// A normal visit is clean: no console error, no failed request, and the
// site's files are served with the types browsers need.

import { type Page } from "@playwright/test";
import { card, expect, test, waitLive } from "./server";

/** Records everything on a page that a person's devtools would show as a problem. */
function watch(page: Page): string[] {
  const problems: string[] = [];
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console.error: ${m.text()} (${m.location().url})`);
  });
  page.on("pageerror", (e) => problems.push(`uncaught: ${e.message}`));
  page.on("requestfailed", (r) => problems.push(`failed: ${r.method()} ${r.url()}: ${r.failure()?.errorText}`));
  page.on("response", (r) => {
    if (r.status() >= 400) problems.push(`HTTP ${r.status()}: ${r.request().method()} ${r.url()}`);
  });
  return problems;
}

test.describe("a normal load", () => {
  // The simulator keeps three devices changing, as on a real first start.
  test.use({ serverOptions: { simulator: "200ms" } });

  test("logs no console error", async ({ page, server }) => {
    const problems = watch(page);
    const requested: string[] = [];
    page.on("request", (r) => requested.push(new URL(r.url()).pathname));

    await page.goto("/");
    await waitLive(page);
    for (const id of ["freezer", "greenhouse", "server-rack"]) {
      await expect(card(page, id)).toHaveCount(1);
    }
    await server.post("rack-1", { name: "Rack", temperature: 21, humidity: 45, power_on: true, metrics: { load: 0.5 } });
    await expect(card(page, "rack-1").getByTestId("temperature")).toHaveText("21.0 °C", { timeout: 1_000 });
    // Let the simulator and the page's clock tick a few times.
    await page.waitForTimeout(2_500);
    await waitLive(page);

    expect(requested).toEqual(expect.arrayContaining(["/pkg/telltale.js", "/pkg/telltale.wasm", "/pkg/telltale.css"]));
    expect(problems).toEqual([]);
  });

  test("the page names a favicon that is served", async ({ page }) => {
    const problems = watch(page);
    await page.goto("/");
    await waitLive(page);
    const href = await page.locator('head link[rel="icon"]').getAttribute("href");
    expect(href).toBeTruthy();
    const icon = await page.request.get(new URL(href!, page.url()).href);
    expect(icon.status()).toBe(200);
    expect(icon.headers()["content-type"]).toMatch(/^image\//);
    expect(problems).toEqual([]);
  });
});

test("the site's files are served with their types", async ({ request, server }) => {
  const pkg: Record<string, RegExp> = {
    "/pkg/telltale.js": /^(text|application)\/javascript/,
    "/pkg/telltale.wasm": /^application\/wasm/,
    "/pkg/telltale.css": /^text\/css/,
  };
  for (const [path, type] of Object.entries(pkg)) {
    const r = await request.get(`${server.url}${path}`);
    expect(r.status(), path).toBe(200);
    expect(r.headers()["content-type"], path).toMatch(type);
  }
});
