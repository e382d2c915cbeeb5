// Cluster mode on the page: an instance whose Redis goes away says so.

import { spawn, type ChildProcess } from "node:child_process";
import { accepts, card, expect, freePort, test as base, waitLive } from "./server";

/** A private redis-server on a free port, keeping nothing on disk. */
class Redis {
  private child: ChildProcess | null = null;

  private constructor(readonly port: number) {}

  static async start(): Promise<Redis> {
    const redis = new Redis(await freePort());
    await redis.resume();
    return redis;
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}/0`;
  }

  /** Kills it: all it held is gone. */
  async stop(): Promise<void> {
    const child = this.child;
    this.child = null;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGKILL");
    await exited;
  }

  /** Starts it again, empty, on the same port; resolves once it accepts connections. */
  async resume(): Promise<void> {
    const args = ["--port", String(this.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
    this.child = spawn("redis-server", args, { stdio: "ignore" });
    const deadline = Date.now() + 10_000;
    while (!(await accepts(this.port))) {
      if (Date.now() > deadline) throw new Error(`redis-server did not listen on ${this.port}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

const test = base.extend<{ redis: Redis }>({
  redis: async ({}, use) => {
    const redis = await Redis.start();
    try {
      await use(redis);
    } finally {
      await redis.stop();
    }
  },
  serverOptions: async ({ redis }, use) => {
    await use({ args: ["--redis-url", redis.url] });
  },
});

test("the page marks a degraded instance and clears the mark when Redis is back", async ({ page, server, redis }) => {
  await server.post("lab", { name: "Lab", temperature: 20 });
  await page.goto("/");
  await waitLive(page);
  const degraded = page.getByTestId("degraded");
  await expect(degraded).toHaveCount(0);

  await redis.stop();
  await expect(degraded).toHaveText("Degraded: read-only");
  // Still connected, still showing the last known values.
  await expect(page.getByTestId("connection")).toHaveText("Live");
  await expect(card(page, "lab").getByTestId("temperature")).toHaveText("20.0 °C");

  await redis.resume();
  await expect(degraded).toHaveCount(0, { timeout: 15_000 });
  await server.post("lab", { temperature: 21.5 });
  await expect(card(page, "lab").getByTestId("temperature")).toHaveText("21.5 °C");
});
