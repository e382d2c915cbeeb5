// A device page's "Recent changes": rendered by the server, extended live
// by the events the page follows, the same after a reload.

import { expect, test, waitLive } from "./server";

test("a device page lists its changes, newest first, and adds new ones live", async ({
  page,
  server,
}) => {
  await server.post("rig", { name: "Rig", temperature: 20, power_on: true });
  await page.goto("/devices/rig");
  await waitLive(page);
  const changes = page.getByTestId("change");
  await expect(changes).toHaveCount(1);
  await expect(changes.first()).toHaveAttribute("data-kind", "registered");
  await expect(changes.first()).toContainText("First seen");

  // A reading alone is no change (the charts show it); power is.
  await server.post("rig", { temperature: 21 });
  await server.post("rig", { power_on: false, name: "Test rig" });
  // One event's changes in a fixed order: name, power, link, staleness, alerts.
  const texts = ["Renamed to “Test rig”", "Power off", "First seen"];
  const words = page.locator("[data-testid=change] span");
  await expect(words).toHaveText(texts);
  await expect(changes.first()).toHaveAttribute("data-kind", "renamed");

  // What the server recorded reads the same.
  await page.reload();
  await waitLive(page);
  await expect(words).toHaveText(texts);
});
