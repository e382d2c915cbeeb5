// The hydrated page and its event stream.

import { card, expect, indicator, test, waitLive } from "./server";

test("the indicator reads Live once the stream is open", async ({ page, server }) => {
  await page.goto("/");
  await waitLive(page);
  await expect(page.getByRole("status")).toHaveText("Live");
  await expect(indicator(page)).toHaveClass(/\blive\b/);
  await expect(page.locator("main.grid")).not.toHaveClass(/\bstale\b/);
  // One page holds exactly one stream.
  await expect.poll(async () => (await server.health()).subscribers).toBe(1);
});

test("a POST shows in the page within a second, without a reload", async ({ page, server }) => {
  await server.post("rack-1", {
    name: "Rack",
    temperature: 20,
    humidity: 40,
    power_on: true,
    metrics: { fan_rpm: 1000 },
  });
  await page.goto("/");
  // Publishing before the stream is open would race it.
  await waitLive(page);
  const rack = card(page, "rack-1");
  await expect(rack.getByTestId("temperature")).toHaveText("20.0 °C");

  // Survives only if the document is never reloaded.
  await page.evaluate(() => {
    (window as unknown as { e2eMarker: string }).e2eMarker = "same document";
  });
  const navigations: string[] = [];
  page.on("framenavigated", (frame) => {
    if (frame === page.mainFrame()) navigations.push(frame.url());
  });

  await server.post("rack-1", {
    name: "Rack A",
    temperature: 23.66,
    humidity: 51.26,
    power_on: false,
    metrics: { fan_rpm: 1320.5, load: 0.75 },
  });
  const fast = { timeout: 1_000 };
  await expect(rack.getByTestId("temperature")).toHaveText("23.7 °C", fast);
  await expect(rack.getByTestId("humidity")).toHaveText("51.3 %", fast);
  await expect(rack.getByTestId("power")).toHaveText("off", fast);
  await expect(rack.getByTestId("name")).toHaveText("Rack A", fast);
  await expect(rack.locator('li[data-testid="metric"][data-metric="fan_rpm"]')).toContainText("1320.5", fast);
  await expect(rack.locator('li[data-testid="metric"][data-metric="load"]')).toContainText("0.75", fast);
  await expect(rack.getByTestId("updated")).toHaveText(/^updated \d+ s ago$/);

  // A device that appears while the page is open gets its own card.
  await server.post("rack-0", { temperature: 18 });
  await expect(card(page, "rack-0").getByTestId("temperature")).toHaveText("18.0 °C", fast);
  const ids = await page
    .locator('article[data-testid="device"]')
    .evaluateAll((cards) => cards.map((c) => c.getAttribute("data-device")));
  expect(ids).toEqual(["rack-0", "rack-1"]);

  expect(await page.evaluate(() => (window as unknown as { e2eMarker?: string }).e2eMarker)).toBe(
    "same document",
  );
  expect(navigations).toEqual([]);
  await expect(indicator(page)).toHaveText("Live");
});

test("two open pages both update on one POST", async ({ page, context, browser, server }) => {
  await server.post("rack-1", { name: "Rack", temperature: 20, humidity: 40, power_on: true });

  // Two pages in one context (they share a connection pool) and one in another.
  const second = await context.newPage();
  const otherContext = await browser.newContext({ baseURL: server.url });
  try {
    const third = await otherContext.newPage();
    const pages = [page, second, third];
    for (const p of pages) {
      await p.goto("/");
      await waitLive(p);
      await expect(card(p, "rack-1").getByTestId("temperature")).toHaveText("20.0 °C");
    }
    await expect.poll(async () => (await server.health()).subscribers).toBe(pages.length);

    await server.post("rack-1", { temperature: 27.2, power_on: false });
    for (const p of pages) {
      await expect(card(p, "rack-1").getByTestId("temperature")).toHaveText("27.2 °C", { timeout: 1_000 });
      await expect(card(p, "rack-1").getByTestId("power")).toHaveText("off", { timeout: 1_000 });
    }

    await server.post("pump", { name: "Pump", humidity: 12.5 });
    for (const p of pages) {
      await expect(card(p, "pump").getByTestId("name")).toHaveText("Pump", { timeout: 1_000 });
      await expect(card(p, "pump").getByTestId("humidity")).toHaveText("12.5 %", { timeout: 1_000 });
    }
  } finally {
    await otherContext.close();
  }
});

test.describe("on a phone-width screen", () => {
  test.use({ viewport: { width: 390, height: 800 } });

  test("long names never hide a value nor widen the page", async ({ page, server }) => {
    const metric = "a_very_long_metric_name_for_the_inlet_pressure_kpa";
    await server.post("cold-room", {
      name: "Cold-storage-room-B-west-wing-compressor-unit-number-0000000042",
      temperature: 4,
      metrics: { [metric]: 101.325 },
    });
    const fits = async () => {
      const [scroll, client] = await page.evaluate(() => [
        document.documentElement.scrollWidth,
        document.documentElement.clientWidth,
      ]);
      expect(scroll, "the page scrolls sideways").toBeLessThanOrEqual(client);
    };
    await page.goto("/");
    await waitLive(page);
    const row = card(page, "cold-room").locator(`li[data-metric="${metric}"]`);
    const value = row.locator(".metric-value");
    await expect(value).toHaveText("101.33 kPa");
    await expect(row.locator(".metric-name")).toHaveAttribute("title", metric);
    const [rowBox, valueBox] = [await row.boundingBox(), await value.boundingBox()];
    expect(valueBox!.x + valueBox!.width).toBeLessThanOrEqual(rowBox!.x + rowBox!.width + 0.5);
    await fits();
    await page.goto("/devices/cold-room");
    await waitLive(page);
    await expect(page.locator(`[data-testid="reading"][data-metric="${metric}"]`)).toContainText("101.33 kPa");
    await fits();
  });
});
