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

test("the dashboard lists every device's changes, each naming its device, live", async ({
  page,
  server,
}) => {
  await server.post("fridge", { name: "Fridge", power_on: true });
  await server.post("oven", { name: "Oven", power_on: true });
  await page.goto("/");
  await waitLive(page);
  const list = page.getByTestId("changes");
  const changes = list.getByTestId("change");
  const names = list.getByTestId("change-device");
  await expect(changes).toHaveCount(2);
  await expect(names).toHaveText(["Oven", "Fridge"]);

  await server.post("fridge", { power_on: false });
  await expect(changes.first()).toHaveAttribute("data-kind", "power");
  await expect(changes.first()).toContainText("Power off");
  await expect(names).toHaveText(["Fridge", "Oven", "Fridge"]);
  await expect(names.first()).toHaveAttribute("href", "/devices/fridge");

  // A new name shows on every line of its device, as on its card.
  await server.post("oven", { name: "Big oven" });
  await expect(names).toHaveText(["Big oven", "Fridge", "Big oven", "Fridge"]);
  await expect(changes.first()).toContainText("Renamed to “Big oven”");

  // What the server recorded reads the same after a reload.
  await page.reload();
  await waitLive(page);
  await expect(names).toHaveText(["Big oven", "Fridge", "Big oven", "Fridge"]);
  await expect(list.locator("[data-testid=change] > span")).toHaveText([
    "Renamed to “Big oven”",
    "Power off",
    "First seen",
    "First seen",
  ]);
});
