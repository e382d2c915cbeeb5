// The server goes away and comes back on the same port, with no memory of
// its devices: the open page must say it is reconnecting, come back to Live
// on its own and show what the new server knows, without a reload.

import { card, chart, durableTest, expect, indicator, test, waitLive } from "./server";

const cases = [
  { how: "stopped (SIGTERM)", signal: "SIGTERM" },
  { how: "killed (SIGKILL)", signal: "SIGKILL" },
] as const;

for (const { how, signal } of cases) {
  test(`the page reconnects after the server is ${how} and started again`, async ({ page, server }) => {
    await server.post("rack-1", { name: "Rack", temperature: 20, humidity: 40, power_on: true });
    await server.post("old-only", { name: "Gone after restart", temperature: 5 });
    await page.goto("/");
    await waitLive(page);
    const rack = card(page, "rack-1");
    await expect(rack.getByTestId("temperature")).toHaveText("20.0 °C");
    await expect(card(page, "old-only")).toHaveCount(1);
    await page.evaluate(() => {
      (window as unknown as { e2eMarker: string }).e2eMarker = "same document";
    });
    const port = server.port;

    const exit = await server.stop(signal);
    if (signal === "SIGTERM") {
      // Open event streams must not hold up a graceful shutdown.
      expect(exit.forced, "the server did not exit within 5 s of SIGTERM").toBe(false);
      expect(exit.code, "exit code after SIGTERM").toBe(0);
    }
    await expect(indicator(page)).toHaveText("Reconnecting…");
    await expect(page.locator("main.grid")).toHaveClass(/\bstale\b/);
    // While the server is away the page keeps the last values it knew.
    await expect(rack.getByTestId("temperature")).toHaveText("20.0 °C");
    // Let the browser's reconnection fail at least once (it retries after 1 s).
    await page.waitForTimeout(1_500);
    await expect(indicator(page)).toHaveText(/^(Reconnecting…|Offline)$/);

    await server.start();
    expect(server.port).toBe(port);
    // Posted at once, so this may land before or after the page is back:
    // either way the page must end up with these values.
    await server.post("rack-1", { name: "Rack again", temperature: 30.5, humidity: 55, power_on: false });

    await waitLive(page, 15_000);
    await expect(page.locator("main.grid")).not.toHaveClass(/\bstale\b/);
    await expect(rack.getByTestId("name")).toHaveText("Rack again");
    await expect(rack.getByTestId("temperature")).toHaveText("30.5 °C");
    await expect(rack.getByTestId("humidity")).toHaveText("55.0 %");
    await expect(rack.getByTestId("power")).toHaveText("off");
    // The new server never heard of this one: the page follows the server.
    await expect(card(page, "old-only")).toHaveCount(0);

    // Live again for real: new values and a new device arrive within a second.
    await server.post("rack-1", { temperature: 31.5 });
    await expect(rack.getByTestId("temperature")).toHaveText("31.5 °C", { timeout: 1_000 });
    await server.post("rack-2", { name: "Second rack", temperature: 22.5, power_on: true });
    const rack2 = card(page, "rack-2");
    await expect(rack2.getByTestId("name")).toHaveText("Second rack", { timeout: 1_000 });
    await expect(rack2.getByTestId("temperature")).toHaveText("22.5 °C", { timeout: 1_000 });
    await expect(rack2.getByTestId("power")).toHaveText("on", { timeout: 1_000 });

    expect(await page.evaluate(() => (window as unknown as { e2eMarker?: string }).e2eMarker)).toBe(
      "same document",
    );
    await expect.poll(async () => (await server.health()).subscribers).toBe(1);
  });
}

// A frozen server (or a proxy or network path that holds the connection open
// with nobody behind it) never closes the stream: only its silence tells.
test.describe("a server that freezes", () => {
  test.use({ serverOptions: { args: ["--heartbeat", "1s"] } });

  test("the page stops saying Live once its stream goes silent, and is live again when the server thaws", async ({
    page,
    server,
  }) => {
    await server.post("rack-1", { name: "Rack", temperature: 20 });
    await page.goto("/");
    await waitLive(page);
    const rack = card(page, "rack-1");
    server.signal("SIGSTOP");
    try {
      // Three heartbeats of silence, then the page says so.
      await expect(indicator(page)).toHaveText("Reconnecting…", { timeout: 8_000 });
      await expect(page.locator("main.grid")).toHaveClass(/\bstale\b/);
      await expect(rack.getByTestId("temperature")).toHaveText("20.0 °C");
    } finally {
      server.signal("SIGCONT");
    }
    await waitLive(page);
    await server.post("rack-1", { temperature: 21.5 });
    await expect(rack.getByTestId("temperature")).toHaveText("21.5 °C", { timeout: 1_000 });
    await expect.poll(async () => (await server.health()).subscribers).toBe(1);
  });
});

// On the same --data-dir the server comes back with what it stored: the open
// device page resumes without a gap, and a reload renders the same values and
// the chart's whole history.
durableTest("a restart on the same data directory keeps the page's values and the chart's history", async ({
  page,
  server,
}) => {
  for (const t of [20, 21, 22]) await server.post("rack-1", { name: "Rack", temperature: t, humidity: 40 });
  await page.goto("/devices/rack-1");
  await waitLive(page);
  const temperature = chart(page, "temperature").locator("svg");
  await expect(temperature).toHaveAttribute("data-points", "3");

  await server.restart("SIGKILL");
  // Resumed from its last event id: the new reading is the fourth point, once.
  await server.post("rack-1", { temperature: 23.5 });
  await waitLive(page, 15_000);
  await expect(temperature).toHaveAttribute("data-points", "4");
  const value = page.locator('[data-testid="reading"][data-metric="temperature"] [data-testid="value"]');
  await expect(value).toHaveText("23.5 °C");

  // What the restarted server renders: the same values and the same history.
  await page.reload();
  await expect(page.getByTestId("name")).toHaveText("Rack");
  await expect(value).toHaveText("23.5 °C");
  await expect(temperature).toHaveAttribute("data-points", "4");
  await expect(chart(page, "humidity").locator("svg")).toHaveAttribute("data-points", "1");
  await page.goto("/");
  await expect(card(page, "rack-1").getByTestId("temperature")).toHaveText("23.5 °C");
  expect(Number(await card(page, "rack-1").getByTestId("sparkline").getAttribute("data-points"))).toBeGreaterThanOrEqual(1);
});
