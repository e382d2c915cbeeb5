import { defineConfig, devices } from "@playwright/test";

// Each test starts its own `telltale` server (see tests/server.ts), so no
// `webServer` here and nothing depends on the one `cargo leptos end-to-end`
// starts. The binary must have been built by `cargo leptos build` first: it
// embeds the site (`target/site`) that build produces.
export default defineConfig({
  testDir: "tests",
  // Tests never share a server, so files may run side by side; two workers
  // fit the 2-core machines (the server and Chromium share them).
  fullyParallel: false,
  workers: 2,
  retries: 0,
  forbidOnly: !!process.env.CI,
  timeout: 30_000,
  expect: { timeout: 5_000 },
  // `list` prints one line per test and a "N passed" summary that CI can read.
  reporter: "list",
  use: {
    actionTimeout: 10_000,
    navigationTimeout: 15_000,
    trace: "retain-on-failure",
  },
  projects: [
    {
      name: "chromium",
      use: {
        ...devices["Desktop Chrome"],
        launchOptions: {
          // Debian's Chromium; Playwright's own browser builds are never downloaded.
          executablePath: "/usr/bin/chromium",
          args: [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
          ],
        },
      },
    },
  ],
});
