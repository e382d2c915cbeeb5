// A browser whose clock is wrong: the page keeps the server's time, read
// off the times the server stamps, for "updated N s ago", the times of
// changes and the charts' right edge.

import { card, chart, expect, test, waitLive } from "./server";

const HOUR = 3_600_000;

test.beforeEach(async ({ page }) => {
  // The machine's clock runs an hour ahead; its monotonic clock is fine.
  await page.addInitScript((shift: number) => {
    const Real = Date;
    class Ahead extends Real {
      constructor(...args: ConstructorParameters<DateConstructor>) {
        if (args.length === 0) super(Real.now() + shift);
        else super(...args);
      }
      static now() {
        return Real.now() + shift;
      }
    }
    (window as unknown as { Date: DateConstructor }).Date = Ahead as DateConstructor;
  }, HOUR);
});

test("a browser an hour ahead still counts seconds and times changes by the server", async ({
  page,
  server,
}) => {
  await server.post("rack-1", { name: "Rack", temperature: 20, power_on: true });
  await page.goto("/");
  await waitLive(page);
  // The page's scripts do see the wrong hour.
  const skew = await page.evaluate(() => Date.now() - performance.timeOrigin - performance.now());
  expect(skew).toBeGreaterThan(HOUR - 60_000);

  // Hydrated, the clock has ticked: still seconds, not "1 h ago".
  const rack = card(page, "rack-1");
  await expect(rack.getByTestId("updated")).toHaveText(/^updated \d s ago$/);
  await server.post("rack-1", { power_on: false });
  const change = page.getByTestId("changes").getByTestId("change").first();
  await expect(change).toContainText("Power off");
  const at = Date.parse((await change.locator("time").getAttribute("datetime")) ?? "");
  expect(Math.abs(at - Date.now())).toBeLessThan(60_000);
  await expect(rack.getByTestId("updated")).toHaveText(/^updated \d s ago$/);
});

test("a browser an hour ahead charts the last hour of the server's clock", async ({
  page,
  server,
}) => {
  await server.post("rack-1", { temperature: 20 });
  await page.goto("/devices/rack-1");
  await waitLive(page);
  const svg = chart(page, "temperature").locator("svg");
  // An hour ahead, the reading would fall off the chart's left edge.
  await expect(svg).toHaveAttribute("data-points", "1");
  await server.post("rack-1", { temperature: 21 });
  await expect(svg).toHaveAttribute("data-points", "2");
});
