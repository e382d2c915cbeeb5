// Readings out of their limits: the card and value are marked, and the
// attention strip at the top lists the device until it is back in range.
//
// Needs `PUT /api/devices/{id}/thresholds` (the alerts branch): on a branch
// without it these fail at the PUT.

import { card, expect, signIn, test, waitLive } from "./server";

test("a reading out of range highlights its card and lists it under attention until it is back", async ({
  page,
  server,
}) => {
  await server.post("rack-1", { name: "Rack", temperature: 20, humidity: 40, metrics: { fan_rpm: 900 } });
  await server.post("rack-2", { name: "Other rack", temperature: 20 });
  await server.putThresholds("rack-1", { temperature: { max: 30 }, fan_rpm: { min: 500 } });
  await page.goto("/");
  await waitLive(page);
  const rack = card(page, "rack-1");
  const attention = page.getByTestId("attention");
  await expect(attention).toHaveCount(0);
  await expect(rack).not.toHaveClass(/\balerting\b/);
  await expect(page).toHaveTitle("Telltale");

  await server.post("rack-1", { temperature: 31.5 });
  await expect(rack).toHaveClass(/\balerting\b/, { timeout: 1_000 });
  const alert = rack.getByTestId("alert");
  await expect(alert).toHaveCount(1);
  await expect(alert).toHaveText("31.5 °C");
  await expect(alert).toHaveClass(/\balerting\b/);
  await expect(alert).toHaveAttribute("title", "above the maximum of 30 °C");
  await expect(rack.getByTestId("temperature")).toHaveText("31.5 °C");
  await expect(attention).toBeVisible();
  const link = attention.getByRole("link", { name: "Rack" });
  await expect(link).toHaveAttribute("href", "/devices/rack-1");
  await expect(attention.getByRole("link")).toHaveCount(1);
  // A tab in the background says so in its title.
  await expect(page).toHaveTitle("(1) Telltale");
  await expect(card(page, "rack-2")).not.toHaveClass(/\balerting\b/);

  // A second reading out of range, below a minimum this time.
  await server.post("rack-1", { metrics: { fan_rpm: 100 } });
  await expect(rack.getByTestId("alert")).toHaveCount(2, { timeout: 1_000 });
  await expect(rack.locator('li[data-metric="fan_rpm"] [data-testid="alert"]')).toHaveAttribute(
    "title",
    "below the minimum of 500 rpm",
  );

  // Back in range: nothing is marked and the strip goes away.
  await server.post("rack-1", { temperature: 25, metrics: { fan_rpm: 900 } });
  await expect(rack).not.toHaveClass(/\balerting\b/, { timeout: 1_000 });
  await expect(rack.getByTestId("alert")).toHaveCount(0);
  await expect(rack.getByTestId("temperature")).toHaveText("25.0 °C");
  await expect(attention).toHaveCount(0);
  await expect(page).toHaveTitle("Telltale");
});

test.describe("without JavaScript", () => {
  test.use({ javaScriptEnabled: false });

  test("the first HTML shows the alert, on the dashboard and the device page", async ({ page, server }) => {
    await server.post("rack-1", { name: "Rack", temperature: 20 });
    await server.putThresholds("rack-1", { temperature: { max: 30 } });
    await server.post("rack-1", { temperature: 35 });

    await page.goto("/");
    await expect(page).toHaveTitle("(1) Telltale");
    const rack = card(page, "rack-1");
    await expect(rack).toHaveClass(/\balerting\b/);
    await expect(rack.getByTestId("alert")).toHaveAttribute("title", "above the maximum of 30 °C");
    await page.getByTestId("attention").getByRole("link", { name: "Rack" }).click();
    await expect(page).toHaveURL(/\/devices\/rack-1$/);
    await expect(page.getByTestId("alerting")).toHaveText("alert");
    await expect(
      page.locator('[data-testid="reading"][data-metric="temperature"] [data-testid="alert"]'),
    ).toHaveText("35.0 °C");
    // Its chart draws the limit it broke.
    const chart = page.locator('[data-testid="chart"][data-metric="temperature"]');
    await expect(chart.getByTestId("limit")).toHaveAttribute("data-kind", "max");
    await expect(chart.locator("text.limit")).toHaveText("max 30.0 °C");
  });
});

test("an operator sets a device's limits on its page: the chart draws them and the alert follows", async ({
  page,
  server,
}) => {
  await server.post("rack-1", { name: "Rack", temperature: 20, humidity: 40 });
  await page.goto("/devices/rack-1");
  // Signed out: the limits show only in the charts, and there are none yet.
  await expect(page.getByTestId("limits")).toHaveCount(0);
  await expect(page.getByTestId("limit")).toHaveCount(0);

  await page.goto("/");
  await signIn(page, server.operatorToken);
  await expect(page.getByTestId("operator")).toBeVisible();
  await page.goto("/devices/rack-1");
  await waitLive(page);
  const form = page.getByTestId("limits");
  const temperature = form.locator('tr[data-metric="temperature"]');
  await temperature.getByTestId("limit-max").fill("warm");
  await form.getByTestId("save-limits").click();
  await expect(form.getByTestId("limits-error")).toHaveText("Temperature max: “warm” is not a number");

  await temperature.getByTestId("limit-max").fill("15");
  await form.getByTestId("save-limits").click();
  await expect(form.getByTestId("limits-saved")).toHaveText("Saved");
  const chart = page.locator('[data-testid="chart"][data-metric="temperature"]');
  await expect(chart.getByTestId("limit")).toHaveAttribute("data-kind", "max");
  await expect(chart.locator("text.limit")).toHaveText("max 15.0 °C");
  // 20 °C is past the new maximum: the server says so at once.
  await expect(page.getByTestId("alerting")).toHaveText("alert");
  const stored = await (await page.request.get(`${server.url}/api/thresholds`)).json();
  expect(stored.devices["rack-1"]).toEqual({ temperature: { max: 15 } });

  // Cleared: no limit, no alert; a reload shows the same.
  await temperature.getByTestId("limit-max").fill("");
  await form.getByTestId("save-limits").click();
  await expect(page.getByTestId("alerting")).toHaveCount(0);
  await expect(chart.getByTestId("limit")).toHaveCount(0);
  await page.reload();
  const field = page.getByTestId("limits").locator('tr[data-metric="temperature"]').getByTestId("limit-max");
  await expect(field).toHaveValue("");
});

test("limits set elsewhere show at once on an open device page: chart, changes and the form", async ({
  page,
  server,
}) => {
  await server.post("rack-1", { name: "Rack", temperature: 20, humidity: 40 });
  await page.goto("/");
  await signIn(page, server.operatorToken);
  await page.goto("/devices/rack-1");
  await waitLive(page);
  const form = page.getByTestId("limits");
  const row = (metric: string) => form.locator(`tr[data-metric="${metric}"]`);
  // This operator is typing a humidity limit as another sets limits.
  await row("humidity").getByTestId("limit-min").fill("5");
  await server.putThresholds("rack-1", { temperature: { max: 25 }, humidity: { min: 10 } });

  const chart = page.locator('[data-testid="chart"][data-metric="temperature"]');
  await expect(chart.locator("text.limit")).toHaveText("max 25.0 °C");
  await expect(page.getByTestId("change").first()).toContainText(
    "Limits set: Humidity min 10.0 %; Temperature max 25.0 °C",
  );
  await expect(row("temperature").getByTestId("limit-max")).toHaveValue("25");
  await expect(row("humidity").getByTestId("limit-min")).toHaveValue("5");
});
