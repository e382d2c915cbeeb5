// Charts: the device page's line charts and the dashboard cards' sparklines,
// drawn from the stored history by the server and extended live.
//
// These run on a temporary --data-dir: the history comes from the store.

import {
  card,
  chart,
  durableTest as test,
  expect,
  indicator,
  test as memoryTest,
  pointsOf,
  type Server,
  waitLive,
} from "./server";
import type { Page } from "@playwright/test";

const readings = [
  { temperature: 20.5, humidity: 40, metrics: { fan_rpm: 900 } },
  { temperature: 21.5, humidity: 42, metrics: { fan_rpm: 1100 } },
  { temperature: 23.0, humidity: 41, metrics: { fan_rpm: 1000 } },
];

test.describe("without JavaScript", () => {
  test.use({ javaScriptEnabled: false });

  test("the device page's first HTML has a chart with points for each metric", async ({ page, server }) => {
    await server.post("rack-1", { name: "Rack one", power_on: true });
    for (const r of readings) await server.post("rack-1", r);

    const response = await page.goto("/devices/rack-1");
    expect(response?.status()).toBe(200);
    await expect(page.getByTestId("name")).toHaveText("Rack one");
    await expect(page).toHaveTitle("Rack one · Telltale");

    // The current values.
    const value = (metric: string) =>
      page.locator(`[data-testid="reading"][data-metric="${metric}"] [data-testid="value"]`);
    await expect(value("temperature")).toHaveText("23.0 °C");
    await expect(value("humidity")).toHaveText("41.0 %");
    await expect(value("fan_rpm")).toHaveText("1000 rpm");
    await expect(page.getByTestId("power")).toHaveText("on");

    // One chart per metric, in page order, each with the three readings.
    const charts = page.locator('figure[data-testid="chart"]');
    await expect(charts).toHaveCount(3);
    expect(await charts.evaluateAll((fs) => fs.map((f) => f.getAttribute("data-metric")))).toEqual([
      "temperature",
      "humidity",
      "fan_rpm",
    ]);
    for (const metric of ["temperature", "humidity", "fan_rpm"]) {
      const svg = chart(page, metric).locator("svg");
      await expect(svg).toHaveAttribute("data-points", "3");
      await expect(svg.locator("path.line")).toHaveAttribute("d", /^M[\d.]+,[\d.]+H/);
      // Time labels (hh:mm, UTC) and value labels.
      await expect(svg.locator(".x-axis text").first()).toHaveText(/^\d\d:\d\d$/);
      expect(await svg.locator(".y-axis text").count()).toBeGreaterThanOrEqual(2);
    }
    await expect(chart(page, "temperature").locator("figcaption")).toContainText("°C");
    await expect(chart(page, "temperature").locator("svg")).toContainText("UTC");

    // The range links are plain links: the 24 h view, rendered by the server.
    const ranges = page.getByTestId("ranges");
    await expect(ranges.locator('[aria-current="page"]')).toHaveText("1 h");
    await ranges.getByRole("link", { name: "24 h" }).click();
    await expect(page).toHaveURL(/\/devices\/rack-1\?range=24h$/);
    await expect(ranges.locator('[aria-current="page"]')).toHaveText("24 h");
    await expect(chart(page, "temperature").locator("svg")).toHaveAttribute("data-points", "3");
    await page.goto("/devices/rack-1?range=7d");
    await expect(ranges.locator('[aria-current="page"]')).toHaveText("7 d");
    // Day ticks on a week.
    await expect(chart(page, "temperature").locator(".x-axis text").first()).toHaveText(/^[A-Z][a-z]{2} \d+$/);

    // And back to the dashboard.
    await page.getByTestId("back").click();
    await expect(page).toHaveURL(/\/$/);
    await expect(card(page, "rack-1")).toHaveCount(1);
  });

  test("the dashboard card's sparkline has points and links to the device page", async ({ page, server }) => {
    for (const r of readings) await server.post("rack-1", { name: "Rack one", ...r });
    await server.post("no-readings", { power_on: true });
    await page.goto("/");
    const rack = card(page, "rack-1");
    const spark = rack.getByTestId("sparkline");
    expect(await pointsOf(spark)).toBeGreaterThanOrEqual(1);
    await expect(spark.locator("path")).toHaveAttribute("d", /^M/);
    await expect(rack.getByTestId("spark")).toContainText("Temperature");
    // A device without any reading has no line to draw.
    await expect(card(page, "no-readings").getByTestId("sparkline")).toHaveCount(0);

    await rack.getByTestId("name").getByRole("link").click();
    await expect(page).toHaveURL(/\/devices\/rack-1$/);
    await expect(chart(page, "temperature")).toHaveCount(1);
  });

  test("an unknown device's page is a 404 that says so", async ({ page }) => {
    const response = await page.goto("/devices/nobody");
    expect(response?.status()).toBe(404);
    await expect(page.getByTestId("not-found")).toContainText('There is no device "nobody".');
    const invalid = await page.goto("/devices/NOT%20VALID");
    expect(invalid?.status()).toBe(404);
  });
});

test("a new POST extends the device page's chart without a reload", async ({ page, server }) => {
  // Hydration of the device page is clean: no console error, no failed request.
  const problems: string[] = [];
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console.error: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`uncaught: ${e.message}`));
  page.on("response", (r) => {
    if (r.status() >= 400) problems.push(`HTTP ${r.status()}: ${r.url()}`);
  });
  for (const r of readings) await server.post("rack-1", r);
  await page.goto("/devices/rack-1");
  await waitLive(page);
  await page.evaluate(() => {
    (window as unknown as { e2eMarker: string }).e2eMarker = "same document";
  });
  const temperature = chart(page, "temperature").locator("svg");
  await expect(temperature).toHaveAttribute("data-points", "3");
  const before = await temperature.locator("path.line").getAttribute("d");

  await server.post("rack-1", { temperature: 26.5 });
  await expect(temperature).toHaveAttribute("data-points", "4", { timeout: 1_000 });
  await expect(temperature.locator("path.line")).not.toHaveAttribute("d", before!);
  await expect(
    page.locator('[data-testid="reading"][data-metric="temperature"] [data-testid="value"]'),
  ).toHaveText("26.5 °C");
  // An unchanged humidity adds no point to its chart.
  await expect(chart(page, "humidity").locator("svg")).toHaveAttribute("data-points", "3");

  // A new metric gets a chart of its own.
  await server.post("rack-1", { metrics: { co2_ppm: 612 } });
  await expect(chart(page, "co2_ppm").locator("svg")).toHaveAttribute("data-points", "1", { timeout: 1_000 });
  await expect(chart(page, "co2_ppm").locator("figcaption")).toContainText("ppm");

  // The page follows its own device only.
  await server.post("rack-2", { temperature: 99 });
  await server.post("rack-1", { temperature: 27 });
  await expect(temperature).toHaveAttribute("data-points", "5", { timeout: 1_000 });
  await expect.poll(async () => (await server.health()).subscribers).toBe(1);

  expect(await page.evaluate(() => (window as unknown as { e2eMarker?: string }).e2eMarker)).toBe(
    "same document",
  );
  // Let the page's clock slide the charts a few times.
  await page.waitForTimeout(1_500);
  expect(problems).toEqual([]);
});

/**
 * Restarts a --memory server, which forgets all: the page's last event id
 * means nothing to it, so the page's stream starts from a snapshot, and the
 * history the page knew is gone. `meanwhile` runs before the page may
 * reconnect.
 */
async function restartForgetting(page: Page, server: Server, meanwhile: () => Promise<void>) {
  const events = /\/api\/events/;
  await page.route(events, (route) => route.abort());
  await server.stop();
  await server.start();
  await meanwhile();
  await page.unroute(events);
  await expect(indicator(page)).toHaveText("Live", { timeout: 15_000 });
}

memoryTest("a page whose stream starts afresh reads its charts again", async ({ page, server }) => {
  for (const r of readings) await server.post("rack-1", r);
  await page.goto("/devices/rack-1");
  await waitLive(page);
  const temperature = chart(page, "temperature").locator("svg");
  await expect(temperature).toHaveAttribute("data-points", "3");
  await restartForgetting(page, server, async () => {
    await server.post("rack-1", { temperature: 30 });
    await server.post("rack-1", { temperature: 31 });
  });
  // Exactly the new server's history: not the old points plus new ones.
  await expect(temperature).toHaveAttribute("data-points", "2", { timeout: 5_000 });
  await expect(
    page.locator('[data-testid="reading"][data-metric="temperature"] [data-testid="value"]'),
  ).toHaveText("31.0 °C");
});

memoryTest("a dashboard whose stream starts afresh reads its sparklines again", async ({ page, server }) => {
  await server.post("rack-1", { temperature: 20 });
  await page.goto("/");
  await waitLive(page);
  const spark = card(page, "rack-1").getByTestId("sparkline");
  const before = await pointsOf(spark);
  await server.post("rack-1", { temperature: 21 });
  await server.post("rack-1", { temperature: 22 });
  // A point a minute: the second update is the new point's value.
  await expect(spark).toHaveAttribute("data-last", "22", { timeout: 1_000 });
  expect(await pointsOf(spark)).toBe(before + 1);
  await restartForgetting(page, server, () => server.post("rack-1", { temperature: 30 }).then(() => {}));
  // The new server's history: its one reading, in one or two minute
  // buckets (it holds on into the next) — not the old points and a new one.
  await expect.poll(() => pointsOf(spark), { timeout: 5_000 }).toBeLessThanOrEqual(2);
  await expect(card(page, "rack-1").getByTestId("temperature")).toHaveText("30.0 °C");
});

test("a new POST extends the dashboard card's sparkline", async ({ page, server }) => {
  await server.post("rack-1", { temperature: 20 });
  await page.goto("/");
  await waitLive(page);
  const spark = card(page, "rack-1").getByTestId("sparkline");
  const before = await pointsOf(spark);
  expect(before).toBeGreaterThanOrEqual(1);
  await server.post("rack-1", { temperature: 21 });
  await expect.poll(() => pointsOf(spark), { timeout: 1_000 }).toBe(before + 1);
  await expect(spark).toHaveAttribute("data-last", "21");
  // Within a minute of it, a change moves the new point: the line stays
  // a point a minute, like the history it started from, and ends at the
  // current value.
  await server.post("rack-1", { temperature: 23.5 });
  await expect(spark).toHaveAttribute("data-last", "23.5", { timeout: 1_000 });
  expect(await pointsOf(spark)).toBe(before + 1);
  await server.post("rack-1", { humidity: 50 });
  await page.waitForTimeout(300);
  expect(await pointsOf(spark), "humidity is not the sparkline's metric").toBe(before + 1);
  await expect(spark).toHaveAttribute("data-last", "23.5");
  // A device that appears while the page is open gets a sparkline too.
  await server.post("rack-2", { humidity: 30 });
  await expect(card(page, "rack-2").getByTestId("sparkline")).toHaveAttribute("data-points", "1", {
    timeout: 1_000,
  });
  await expect(card(page, "rack-2").getByTestId("spark")).toContainText("Humidity");
});

test("each chart links to its data as CSV, for the range shown", async ({ page, server }) => {
  await server.post("rack-1", { name: "Rack", temperature: 20 });
  await server.post("rack-1", { temperature: 21.5 });
  await page.goto("/devices/rack-1?range=24h");
  await waitLive(page);
  const link = chart(page, "temperature").getByTestId("csv");
  await expect(link).toHaveAttribute("href", "/api/devices/rack-1/history.csv?metric=temperature&from=24h&step=1m");
  const [download] = await Promise.all([page.waitForEvent("download"), link.click()]);
  expect(download.suggestedFilename()).toBe("rack-1-temperature-24h.csv");
  const text = await (await import("node:fs/promises")).readFile((await download.path())!, "utf8");
  const lines = text.trim().split("\n");
  expect(lines[0]).toBe("t,value,min,max");
  expect(lines.length).toBeGreaterThanOrEqual(2);
  // The newest minute: its time, mean, min and max (the last reading's).
  const [t, , , max] = lines[lines.length - 1].split(",");
  expect(t).toMatch(/^\d{4}-\d\d-\d\dT[\d:.]+Z$/);
  expect(max).toBe("21.5");
});
