// A dashboard closed by `--viewer-token`: the sign-in page, then the page
// that was asked for, live.

import { card, expect, test, waitLive } from "./server";

const VIEWER = "e2e-viewer-token";

test.use({ serverOptions: { args: ["--viewer-token", VIEWER] } });

test("a viewer signs in once and reads the dashboard live", async ({ page, server }) => {
  await server.post("rack-1", { name: "Rack one", temperature: 21.5 });
  await server.post("freezer", { name: "Freezer", temperature: -18 });

  const response = await page.goto("/?q=rack");
  expect(response?.status()).toBe(401);
  await expect(page.getByTestId("viewer-sign-in")).toBeVisible();
  await expect(page.getByText("Rack one")).toHaveCount(0);

  await page.getByTestId("viewer-token").fill("not-the-token");
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByTestId("session-error")).toHaveText("wrong token");

  await page.getByTestId("viewer-token").fill(VIEWER);
  await page.getByRole("button", { name: "Sign in" }).click();
  // Back where the viewer was going, filter kept.
  await expect(page).toHaveURL(/\/\?q=rack$/);
  await waitLive(page);
  const rack = card(page, "rack-1");
  await expect(rack.getByTestId("temperature")).toHaveText("21.5 °C");
  await expect(card(page, "freezer")).toBeHidden();

  await server.post("rack-1", { temperature: 23.5 });
  await expect(rack.getByTestId("temperature")).toHaveText("23.5 °C");
  // A viewer gets no controls.
  await expect(rack.getByTestId("power-switch")).toHaveCount(0);

  // Signing out ends the session: the page is the sign-in page again.
  await page.getByTestId("viewer-sign-out").click();
  await expect(page.getByTestId("viewer-sign-in")).toBeVisible();
  await expect(page.getByText("Rack one")).toHaveCount(0);
});

test.describe("an open dashboard", () => {
  test.use({ serverOptions: {} });

  test("needs no sign-in and offers no viewer sign-out", async ({ page, server }) => {
    await server.post("rack-1", { name: "Rack one", temperature: 21.5 });
    await page.goto("/");
    await waitLive(page);
    await expect(card(page, "rack-1").getByTestId("temperature")).toHaveText("21.5 °C");
    await expect(page.getByTestId("viewer-sign-out")).toHaveCount(0);
  });
});
