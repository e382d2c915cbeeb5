// Removing a device from the page: only an operator, only after a
// confirmation, only a device without a live link; every open page drops it.

import { card, expect, signIn, test, waitLive } from "./server";

test("an operator removes a device; every open page drops it until it reports again", async ({
  page,
  browser,
  server,
}) => {
  await server.post("old-rig", { name: "Old rig", temperature: 20 });
  await server.post("kept", { name: "Kept", temperature: 5 });
  await page.goto("/");
  await waitLive(page);
  await expect(page.getByTestId("remove")).toHaveCount(0);
  await signIn(page, server.operatorToken);
  const remove = card(page, "old-rig").getByTestId("remove");
  await expect(remove).toBeVisible();

  // A viewer elsewhere, on the dashboard and on the device's own page.
  const other = await browser.newContext({ baseURL: server.url });
  try {
    const viewer = await other.newPage();
    await viewer.goto("/");
    await waitLive(viewer);
    await expect(viewer.getByTestId("remove")).toHaveCount(0);
    const devicePage = await other.newPage();
    await devicePage.goto("/devices/old-rig");
    await waitLive(devicePage);
    await expect(devicePage.getByTestId("removed")).toHaveCount(0);

    // Dismissed: nothing happens.
    page.once("dialog", (d) => d.dismiss());
    await remove.click();
    await expect(card(page, "old-rig")).toHaveCount(1);

    let question = "";
    page.once("dialog", (d) => {
      question = d.message();
      return d.accept();
    });
    await remove.click();
    await expect(card(page, "old-rig")).toHaveCount(0);
    expect(question).toContain("Old rig");
    await expect(card(viewer, "old-rig")).toHaveCount(0);
    await expect(card(viewer, "kept")).toHaveCount(1);
    await expect(devicePage.getByTestId("removed")).toBeVisible();
    // Its last state stays on its page; its history went.
    await expect(devicePage.getByTestId("name")).toHaveText("Old rig");
    await expect(devicePage.getByTestId("no-data")).toHaveText("Its history was removed with it.");
    await expect(devicePage.getByTestId("change")).toHaveCount(0);
    await expect(devicePage.getByTestId("no-changes")).toBeVisible();

    // A new report brings it back, everywhere.
    await server.post("old-rig", { temperature: 30 });
    await expect(card(page, "old-rig")).toHaveCount(1);
    await expect(card(viewer, "old-rig").getByTestId("temperature")).toHaveText("30.0 °C");
    await expect(devicePage.getByTestId("removed")).toHaveCount(0);
    await expect(devicePage.getByTestId("change")).toHaveText([/First seen/]);
  } finally {
    await other.close();
  }
});

test.describe("with the simulator", () => {
  test.use({ serverOptions: { simulator: "60s" } });

  test("a device with a live link has no remove button", async ({ page, server }) => {
    await server.post("by-http", { temperature: 1 });
    await page.goto("/");
    await waitLive(page);
    await signIn(page, server.operatorToken);
    await expect(page.getByTestId("power-switch")).toHaveCount(4);
    // The simulator's three are connected: only the one fed over HTTP.
    await expect(page.getByTestId("remove")).toHaveCount(1);
    await expect(card(page, "by-http").getByTestId("remove")).toHaveCount(1);
  });
});
