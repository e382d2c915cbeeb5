// The dashboard's card filter: by name or id, live as one types, kept in
// the address, and rendered by the server without JavaScript.

import { card, expect, test, waitLive, type Server } from "./server";
import type { Page } from "@playwright/test";

async function threeDevices(server: Server) {
  await server.post("greenhouse", { name: "Greenhouse", temperature: 24 });
  await server.post("rack-1", { name: "Server rack", temperature: 31 });
  await server.post("freezer", { name: "Lab freezer", temperature: -20 });
}

const visible = (page: Page) =>
  page.locator('[data-testid="device"]:visible').evaluateAll((cards) => cards.map((c) => c.getAttribute("data-device")));

test("typing filters the cards by name or id, and new devices too", async ({ page, server }) => {
  await threeDevices(server);
  await page.goto("/");
  await waitLive(page);
  const filter = page.getByTestId("filter");
  await filter.fill("RACK");
  await expect.poll(() => visible(page)).toEqual(["rack-1"]);
  await expect(page.getByTestId("filter-count")).toHaveText("1 of 3");
  expect(new URL(page.url()).search).toBe("?q=RACK");
  // A hidden card still follows its device: it shows the news once shown.
  await server.post("freezer", { temperature: -18 });
  // Devices that appear meanwhile are filtered as well.
  await server.post("rack-2", { name: "Backup rack", temperature: 28 });
  await server.post("door", { name: "Door", power_on: true });
  await expect.poll(() => visible(page)).toEqual(["rack-1", "rack-2"]);
  await expect(page.getByTestId("filter-count")).toHaveText("2 of 5");
  await filter.fill("nothing like it");
  await expect.poll(() => visible(page)).toEqual([]);
  await expect(page.getByTestId("no-match")).toHaveText("No device matches \u201cnothing like it\u201d.");
  await filter.fill("");
  await expect.poll(async () => (await visible(page)).length).toBe(5);
  await expect(page.getByTestId("filter-count")).toHaveCount(0);
  expect(new URL(page.url()).pathname + new URL(page.url()).search).toBe("/");
  await expect(card(page, "freezer").getByTestId("temperature")).toHaveText("-18.0 °C");
  // Enter does not reload the page (the stream stays open).
  await filter.fill("green");
  await page.evaluate(() => ((window as unknown as { kept: boolean }).kept = true));
  await filter.press("Enter");
  await expect.poll(() => visible(page)).toEqual(["greenhouse"]);
  expect(await page.evaluate(() => (window as unknown as { kept?: boolean }).kept)).toBe(true);
});

/** The devices whose recent changes show, in list order. */
const changesShown = (page: Page) =>
  page
    .locator('[data-testid="change"]:visible')
    .evaluateAll((changes) => changes.map((c) => c.getAttribute("data-device")));

test("the recent changes follow the filter: those of the devices shown", async ({ page, server }) => {
  await threeDevices(server);
  // A first power state is no change; a switch from it is.
  await server.post("freezer", { power_on: true });
  await server.post("rack-1", { power_on: true });
  await page.goto("/?q=rack");
  await waitLive(page);
  await expect.poll(() => changesShown(page)).toEqual(["rack-1"]);
  // A change of a hidden device is kept, not shown; one of a shown device is.
  await server.post("freezer", { power_on: false });
  await server.post("rack-1", { power_on: false });
  await expect.poll(() => changesShown(page)).toEqual(["rack-1", "rack-1"]);
  await page.getByTestId("filter").fill("lab");
  await expect.poll(() => changesShown(page)).toEqual(["freezer", "freezer"]);
  await page.getByTestId("filter").fill("door");
  await expect(page.getByTestId("no-changes-shown")).toHaveText("No recent change of the devices shown.");
  await page.getByTestId("filter").fill("");
  await expect.poll(async () => (await changesShown(page)).length).toBe(5);
  await expect(page.getByTestId("no-changes-shown")).toBeHidden();
});

test("a reload keeps the filter", async ({ page, server }) => {
  await threeDevices(server);
  await page.goto("/?q=lab");
  await waitLive(page);
  await expect(page.getByTestId("filter")).toHaveValue("lab");
  await expect.poll(() => visible(page)).toEqual(["freezer"]);
});

test("a filter that hides the only device can still be cleared", async ({ page, server }) => {
  await server.post("rack-1", { name: "Rack", temperature: 20 });
  await page.goto("/?q=freezer");
  await waitLive(page);
  await expect(page.getByTestId("no-match")).toBeVisible();
  await page.getByTestId("filter").fill("");
  await expect.poll(() => visible(page)).toEqual(["rack-1"]);
  // With one device and no filter, there is nothing to filter.
  await expect(page.getByTestId("filter")).toHaveCount(0);
});

test.describe("without JavaScript", () => {
  test.use({ javaScriptEnabled: false });

  test("the filter is a form the server answers", async ({ page, server }) => {
    await threeDevices(server);
    await page.goto("/");
    expect((await visible(page)).length).toBe(3);
    await page.getByTestId("filter").fill("green");
    await page.getByTestId("filter").press("Enter");
    await page.waitForURL("**/?q=green");
    expect(await visible(page)).toEqual(["greenhouse"]);
    await expect(page.getByTestId("filter-count")).toHaveText("1 of 3");
    expect(await changesShown(page)).toEqual(["greenhouse"]);
  });
});
