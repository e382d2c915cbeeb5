// Two-way control from the page: operator sign-in (an HttpOnly session
// cookie, never the token in the page), the power switch on each card, and
// the offline badge of a device whose agent went away.

import { type Page } from "@playwright/test";
import { card, expect, indicator, signIn, switches, test, waitLive } from "./server";

/** The card's power text, "on" or "off". */
async function powerText(page: Page, id: string): Promise<string> {
  const text = (await card(page, id).getByTestId("power").textContent())?.trim() ?? "";
  expect(["on", "off"]).toContain(text);
  return text;
}

test.describe("with the simulator", () => {
  // Its devices report once at start, then not for a minute: no random power
  // change lands in the middle of a test.
  test.use({ serverOptions: { simulator: "60s" } });

  test("an operator switches a device; another, signed-out page follows", async ({
    page,
    browser,
    server,
  }) => {
    // Hydrating a signed-in page must agree with its first HTML: a mismatch
    // shows up as a console error or an uncaught panic.
    const problems: string[] = [];
    page.on("console", (m) => {
      if (m.type() === "error") problems.push(`console.error: ${m.text()}`);
    });
    page.on("pageerror", (e) => problems.push(`uncaught: ${e.message}`));

    await page.goto("/");
    await waitLive(page);
    await expect(card(page, "greenhouse")).toHaveCount(1);
    await expect(switches(page)).toHaveCount(0);

    await signIn(page, server.operatorToken);
    await expect(page.getByTestId("operator")).toHaveText("Operator");
    await expect(switches(page)).toHaveCount(3);
    await expect(page.getByTestId("sign-in")).toHaveCount(0);
    // The token was posted once and is kept nowhere the page can read.
    expect(await page.evaluate(() => document.cookie)).toBe("");
    expect(await page.evaluate(() => JSON.stringify({ ...localStorage, ...sessionStorage }))).toBe("{}");
    expect(await page.content()).not.toContain(server.operatorToken);

    // A second page in another browser context: signed out.
    const other = await browser.newContext({ baseURL: server.url });
    try {
      const viewer = await other.newPage();
      await viewer.goto("/");
      await waitLive(viewer);
      await expect(card(viewer, "greenhouse")).toHaveCount(1);
      await expect(switches(viewer)).toHaveCount(0);
      await expect(viewer.getByTestId("sign-out")).toHaveCount(0);

      const before = await powerText(page, "greenhouse");
      const after = before === "on" ? "off" : "on";
      expect(await powerText(viewer, "greenhouse")).toBe(before);
      const power = card(page, "greenhouse").getByTestId("power-switch");
      await expect(power).toHaveAttribute("aria-pressed", String(before === "on"));
      await expect(power).toHaveAttribute("data-state", before);

      // Hold the command back a moment, to see the switch pending.
      let release: () => void = () => {};
      const held = new Promise<void>((r) => (release = r));
      await page.route("**/api/devices/greenhouse/commands", async (route) => {
        await held;
        await route.continue();
      });
      await power.click();
      await expect(power).toHaveAttribute("data-state", "pending");
      await expect(power).toBeDisabled();
      // Nothing changes on the click alone: only the device's event counts.
      await expect(card(page, "greenhouse").getByTestId("power")).toHaveText(before);
      await expect(power).toHaveAttribute("aria-pressed", String(before === "on"));
      release();

      await expect(card(page, "greenhouse").getByTestId("power")).toHaveText(after);
      await expect(card(viewer, "greenhouse").getByTestId("power")).toHaveText(after);
      await expect(power).toHaveAttribute("aria-pressed", String(after === "on"));
      await expect(power).toHaveAttribute("data-state", after);
      await expect(power).toBeEnabled();
      await expect(card(page, "greenhouse").getByTestId("command-error")).toHaveCount(0);
      await expect(switches(viewer)).toHaveCount(0);
      await page.unroute("**/api/devices/greenhouse/commands");

      // And back, without holding.
      await power.click();
      await expect(card(page, "greenhouse").getByTestId("power")).toHaveText(before);
      await expect(card(viewer, "greenhouse").getByTestId("power")).toHaveText(before);
    } finally {
      await other.close();
    }

    // The server renders the controls for the session on a reload.
    await page.reload();
    await waitLive(page);
    await expect(switches(page)).toHaveCount(3);
    // Hydrated: the reloaded page's switch works.
    const power = card(page, "greenhouse").getByTestId("power-switch");
    const now = await powerText(page, "greenhouse");
    await power.click();
    await expect(card(page, "greenhouse").getByTestId("power")).toHaveText(now === "on" ? "off" : "on");
    expect(problems).toEqual([]);

    // Signing out takes them away, for good.
    await page.getByRole("button", { name: "Sign out" }).click();
    await expect(switches(page)).toHaveCount(0);
    await expect(page.getByTestId("sign-in")).toBeVisible();
    await page.reload();
    await waitLive(page);
    await expect(switches(page)).toHaveCount(0);
    const refused = await page.request.post("/api/devices/greenhouse/commands", {
      data: { set: { power_on: true } },
    });
    expect(refused.status()).toBe(401);
  });

  test("an operator switches a device from its own page", async ({ page, server }) => {
    const problems: string[] = [];
    page.on("console", (m) => {
      if (m.type() === "error") problems.push(`console.error: ${m.text()}`);
    });
    page.on("pageerror", (e) => problems.push(`uncaught: ${e.message}`));
    await page.goto("/devices/greenhouse");
    await waitLive(page);
    await expect(switches(page)).toHaveCount(0);

    await page.goto("/");
    await signIn(page, server.operatorToken);
    await expect(page.getByTestId("operator")).toHaveText("Operator");
    await page.goto("/devices/greenhouse");
    await waitLive(page);
    const power = page.getByTestId("power");
    const before = (await power.textContent())?.trim();
    expect(["on", "off"]).toContain(before);
    const after = before === "on" ? "off" : "on";
    const toggle = switches(page);
    await expect(toggle).toHaveAttribute("data-state", before!);
    await toggle.click();
    // The device's confirmed state, from its status event.
    await expect(power).toHaveText(after);
    await expect(toggle).toHaveAttribute("data-state", after);
    // The simulator's device has a live link: it cannot be removed.
    await expect(page.getByTestId("remove")).toHaveCount(0);
    expect(problems).toEqual([]);
  });
});

test("a refused command shows its reason and the switch keeps the real state", async ({ page, server }) => {
  // Fed only by the ingest API: no agent, so no one to apply a command.
  await server.post("pump", { name: "Pump", power_on: true });
  await page.goto("/");
  await waitLive(page);
  await signIn(page, server.operatorToken);
  const pump = card(page, "pump");
  const power = pump.getByTestId("power-switch");
  await expect(power).toHaveAttribute("aria-pressed", "true");

  await power.click();
  await expect(pump.getByTestId("command-error")).toHaveText("no agent is connected for device `pump`");
  await expect(power).toHaveAttribute("aria-pressed", "true");
  await expect(power).toHaveAttribute("data-state", "on");
  await expect(power).toBeEnabled();
  await expect(pump.getByTestId("power")).toHaveText("on");

  // The next change of the real state shows; the next click clears the error.
  await server.post("pump", { power_on: false });
  await expect(pump.getByTestId("power")).toHaveText("off");
  await expect(power).toHaveAttribute("aria-pressed", "false");
  await power.click();
  await expect(pump.getByTestId("command-error")).toHaveText(/no agent is connected/);
  await expect(pump.getByTestId("power")).toHaveText("off");
});

test("a wrong token shows the server's error and no switch", async ({ page, server }) => {
  await server.post("pump", { name: "Pump", power_on: true });
  await page.goto("/");
  await waitLive(page);
  await signIn(page, "not-the-token");
  await expect(page.getByTestId("session-error")).toHaveText("wrong operator token");
  await expect(switches(page)).toHaveCount(0);
  await expect(page.getByTestId("operator")).toHaveCount(0);
  await page.reload();
  await waitLive(page);
  await expect(switches(page)).toHaveCount(0);
});

test("a token typed before the page's code runs is kept, and never sent as a plain form", async ({
  page,
  server,
}) => {
  await server.post("pump", { name: "Pump", power_on: true });
  // Hold the WebAssembly back: the page is the server's HTML only.
  let release: () => void = () => {};
  const held = new Promise<void>((r) => (release = r));
  await page.route("**/pkg/*.wasm", async (route) => {
    await held;
    await route.continue();
  });
  await page.goto("/", { waitUntil: "domcontentloaded" });
  const button = page.getByRole("button", { name: "Sign in" });
  const field = page.getByTestId("operator-token");
  await expect(button).toBeDisabled();
  await expect(button).toHaveAttribute("title", "Signing in needs JavaScript");
  await field.fill(server.operatorToken);
  await field.press("Enter");
  // Still the dashboard: nothing was posted as a form.
  await expect(card(page, "pump")).toHaveCount(1);
  expect(new URL(page.url()).pathname).toBe("/");

  release();
  // The page's code is fetched and compiled only now: as long as waitLive allows.
  await expect(button).toBeEnabled({ timeout: 10_000 });
  await expect(field).toHaveValue(server.operatorToken);
  await button.click();
  await expect(page.getByTestId("operator")).toHaveText("Operator");
  await expect(switches(page)).toHaveCount(1);
});

test("a device whose agent left is shown offline, apart from the page's own state", async ({ page, server }) => {
  await server.post("pump", { name: "Pump", temperature: 12, power_on: true });
  await page.goto("/");
  await waitLive(page);
  const pump = card(page, "pump");
  await expect(pump.getByTestId("temperature")).toHaveText("12.0 °C");
  // Fed over HTTP: never had a live link, so never "offline".
  await expect(pump.getByTestId("offline")).toHaveCount(0);

  // An agent connects for it (from the page's own origin, with the ingest
  // token), then goes away.
  await page.evaluate(
    ({ token }) =>
      new Promise<void>((resolve, reject) => {
        const ws = new WebSocket(`ws://${location.host}/api/ws`);
        ws.onopen = () => ws.send(JSON.stringify({ type: "hello", v: 1, role: "device", token, device: "pump" }));
        ws.onmessage = (e) => {
          const msg = JSON.parse(e.data);
          if (msg.type === "welcome") {
            ws.close();
            resolve();
          } else reject(new Error(`unexpected ${e.data}`));
        };
        ws.onerror = () => reject(new Error("WebSocket error"));
      }),
    { token: server.token },
  );
  await expect(pump.getByTestId("offline")).toHaveText("offline");
  await expect(pump).toHaveClass(/\boffline\b/);
  // Its last values stay, dimmed; the page itself is still live.
  await expect(pump.getByTestId("temperature")).toHaveText("12.0 °C");
  const opacity = await pump.locator(".readings").evaluate((e) => getComputedStyle(e).opacity);
  expect(Number(opacity)).toBeLessThan(1);
  await expect(indicator(page)).toHaveText("Live");
  await expect(page.locator("main.grid")).not.toHaveClass(/\bstale\b/);

  // The first HTML of a new visit says so too.
  await page.reload();
  await expect(card(page, "pump").getByTestId("offline")).toHaveText("offline");
});

test.describe("without JavaScript", () => {
  test.use({ javaScriptEnabled: false });

  test("the first HTML has switches only for a signed-in operator", async ({ page, server }) => {
    await server.post("pump", { name: "Pump", power_on: true });
    await server.post("lamp", { name: "Lamp", power_on: false });
    await page.goto("/");
    await expect(card(page, "pump")).toHaveCount(1);
    await expect(switches(page)).toHaveCount(0);
    await expect(page.getByTestId("sign-in")).toBeVisible();
    // Never sent as a plain form, which the server would refuse.
    await expect(page.getByRole("button", { name: "Sign in" })).toBeDisabled();

    // page.request shares the page's cookies.
    const signedIn = await page.request.post("/api/session", { data: { token: server.operatorToken } });
    expect(signedIn.status()).toBe(200);
    await page.goto("/");
    await expect(switches(page)).toHaveCount(2);
    await expect(card(page, "pump").getByTestId("power-switch")).toHaveAttribute("aria-pressed", "true");
    await expect(card(page, "lamp").getByTestId("power-switch")).toHaveAttribute("aria-pressed", "false");
    // A click would do nothing without the page's code: they say so.
    await expect(card(page, "lamp").getByTestId("power-switch")).toBeDisabled();
    await expect(page.getByTestId("sign-in")).toHaveCount(0);
    expect(await page.content()).not.toContain(server.operatorToken);
  });
});
