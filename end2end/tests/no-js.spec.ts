// The server-rendered page, read with JavaScript off: what a first paint (or
// a browser without WASM) shows, before any hydration or event stream.

import { card, expect, indicator, test } from "./server";

test.describe("without JavaScript", () => {
  test.use({ javaScriptEnabled: false });

  test("the first HTML shows the current values posted before", async ({ page, server }) => {
    await server.post("rack-1", {
      name: "Rack one",
      temperature: 19.0,
      humidity: 40,
      power_on: false,
      metrics: { fan_rpm: 900 },
    });
    // A later, partial update: the page must show the current values, merged.
    await server.post("rack-1", {
      temperature: 21.34,
      humidity: 45,
      power_on: true,
      metrics: { fan_rpm: 1200, load: 0.456 },
    });
    await server.post("freezer", { temperature: -19.96, humidity: 20.04, power_on: false });

    const response = await page.goto("/");
    expect(response?.status()).toBe(200);
    expect(response?.headers()["content-type"]).toContain("text/html");

    const cards = page.locator('article[data-testid="device"]');
    await expect(cards).toHaveCount(2);
    // Cards come in id order.
    await expect(cards.nth(0)).toHaveAttribute("data-device", "freezer");
    await expect(cards.nth(1)).toHaveAttribute("data-device", "rack-1");

    const rack = card(page, "rack-1");
    await expect(rack.getByTestId("name")).toHaveText("Rack one");
    await expect(rack.getByTestId("temperature")).toHaveText("21.3 °C");
    await expect(rack.getByTestId("humidity")).toHaveText("45.0 %");
    await expect(rack.getByTestId("power")).toHaveText("on");
    const metrics = rack.locator('li[data-testid="metric"]');
    await expect(metrics).toHaveCount(2);
    await expect(rack.locator('li[data-testid="metric"][data-metric="fan_rpm"]')).toContainText("1200");
    await expect(rack.locator('li[data-testid="metric"][data-metric="load"]')).toContainText("0.46");
    await expect(rack.getByTestId("updated")).toHaveText(/^updated \d+ s ago$/);

    const freezer = card(page, "freezer");
    // A device that never sent a name is shown by its id.
    await expect(freezer.getByTestId("name")).toHaveText("freezer");
    await expect(freezer.getByTestId("temperature")).toHaveText("-20.0 °C");
    await expect(freezer.getByTestId("humidity")).toHaveText("20.0 %");
    await expect(freezer.getByTestId("power")).toHaveText("off");
    await expect(freezer.locator('li[data-testid="metric"]')).toHaveCount(0);

    // Without a script there is no stream: the page says so.
    await expect(indicator(page)).toHaveText("Offline");
  });

  test("with no device yet, the first HTML says so", async ({ page }) => {
    await page.goto("/");
    await expect(page.locator('article[data-testid="device"]')).toHaveCount(0);
    await expect(page.getByText("No devices yet.")).toBeVisible();
    await expect(indicator(page)).toHaveText("Offline");
  });
});
