// A device that speaks MQTT (`--mqtt`), on the page: its card comes with its
// first report, its power switch commands it through the broker, and its
// Last Will shows it offline.

import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import mqtt from "mqtt";
import { accepts, card, expect, freePort, signIn, test as base, waitLive } from "./server";

/** A private mosquitto on a free port, keeping nothing on disk. */
class Mosquitto {
  private constructor(
    readonly port: number,
    private readonly child: ChildProcess,
    private readonly dir: string,
  ) {}

  static async start(): Promise<Mosquitto> {
    const port = await freePort();
    const dir = mkdtempSync(path.join(os.tmpdir(), "telltale-mosquitto-"));
    const conf = path.join(dir, "mosquitto.conf");
    writeFileSync(conf, `listener ${port} 127.0.0.1\nallow_anonymous true\npersistence false\n`);
    const child = spawn("mosquitto", ["-c", conf], { stdio: "ignore" });
    const deadline = Date.now() + 10_000;
    while (!(await accepts(port))) {
      if (Date.now() > deadline) throw new Error(`mosquitto did not listen on ${port}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    return new Mosquitto(port, child, dir);
  }

  get url(): string {
    return `mqtt://127.0.0.1:${this.port}`;
  }

  stop(): void {
    this.child.kill("SIGKILL");
    rmSync(this.dir, { recursive: true, force: true });
  }
}

const test = base.extend<{ broker: Mosquitto }>({
  broker: async ({}, use) => {
    const broker = await Mosquitto.start();
    try {
      await use(broker);
    } finally {
      broker.stop();
    }
  },
  serverOptions: async ({ broker }, use) => {
    await use({ args: ["--mqtt", broker.url] });
  },
});

test("an MQTT device shows, obeys its switch, and its Last Will takes it offline", async ({
  page,
  server,
  broker,
}) => {
  await expect.poll(() => server.log().includes("MQTT: connected")).toBe(true);
  const device = await mqtt.connectAsync(broker.url, {
    clientId: "kiln",
    will: { topic: "telltale/kiln/online", payload: Buffer.from("false"), qos: 1, retain: true },
    reconnectPeriod: 0,
  });
  // The device applies each command: it reports the new state, then answers.
  await device.subscribeAsync("telltale/kiln/set", { qos: 1 });
  device.on("message", (topic, payload) => {
    if (topic !== "telltale/kiln/set") return;
    const command = JSON.parse(payload.toString());
    void (async () => {
      await device.publishAsync("telltale/kiln/status", JSON.stringify({ power_on: command.set.power_on }), {
        qos: 1,
      });
      await device.publishAsync(
        "telltale/kiln/result",
        JSON.stringify({ request_id: command.request_id, outcome: "applied" }),
        { qos: 1 },
      );
    })();
  });

  await page.goto("/");
  await waitLive(page);
  await device.publishAsync("telltale/kiln/online", "true", { qos: 1, retain: true });
  await device.publishAsync(
    "telltale/kiln/status",
    JSON.stringify({ name: "Kiln", temperature: 640.5, power_on: true }),
    { qos: 1, retain: true },
  );
  const kiln = card(page, "kiln");
  await expect(kiln.getByTestId("temperature")).toHaveText("640.5 °C");
  await expect(kiln.getByTestId("power")).toHaveText("on");
  await expect(kiln.getByTestId("offline")).toHaveCount(0);

  await signIn(page, server.operatorToken);
  const power = kiln.getByTestId("power-switch");
  await power.click();
  await expect(kiln.getByTestId("power")).toHaveText("off");
  await expect(power).toHaveAttribute("aria-pressed", "false");
  await expect(kiln.getByTestId("command-error")).toHaveCount(0);

  // Its connection cut without a goodbye: the broker publishes its Will.
  device.stream.destroy();
  await expect(kiln.getByTestId("offline")).toHaveText("offline");
  await power.click();
  await expect(kiln.getByTestId("command-error")).toHaveText("no agent is connected for device `kiln`");
  await expect(kiln.getByTestId("power")).toHaveText("off");
  await device.endAsync(true);
});
