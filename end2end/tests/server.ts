// Starts, stops and restarts a real `telltale` server for one test, and
// feeds it device statuses through the ingest API.
//
// Every test gets its own server (fixture `server`), on a port the OS picks,
// so tests never see each other's devices and may run in parallel. A test
// can stop the server and start it again on the same port, which is how the
// page's reconnection is tested.
//
// The binary is `../target/debug/telltale` (relative to end2end/), or the
// path in `TELLTALE_BIN` (a relative one is taken from end2end/). It must be
// built by `cargo leptos build`, which builds the site first: the binary
// serves the site (`/pkg/telltale.js`, `.wasm`, `.css`) from what it embedded.

import { test as base, expect, type Locator, type Page } from "@playwright/test";
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import * as http from "node:http";
import net from "node:net";
import * as os from "node:os";
import * as path from "node:path";

const END2END_DIR = path.resolve(__dirname, "..");
const REPO_DIR = path.resolve(END2END_DIR, "..");

export const BIN = path.resolve(
  END2END_DIR,
  process.env.TELLTALE_BIN || "../target/debug/telltale",
);

const READY_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 5_000;
const LOG_LINES_KEPT = 400;

// Servers still running when the test process ends (a crash, ctrl-c) die with it.
const alive = new Set<ChildProcess>();
process.once("exit", () => {
  for (const child of alive) child.kill("SIGKILL");
});

export interface ServerOptions {
  /** Bearer token for the ingest API; a fresh random one by default. */
  token?: string;
  /** The operator token (`--operator-token`); a fresh random one by default. */
  operatorToken?: string;
  /** Run the built-in simulator, reporting at this interval (e.g. "200ms"); off by default. */
  simulator?: string;
  /** Extra command-line arguments. */
  args?: string[];
}

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** True when the server ignored SIGTERM and had to be killed. */
  forced: boolean;
}

export class Server {
  readonly token: string;
  readonly operatorToken: string;
  private child: ChildProcess | null = null;
  private exited: Promise<Exit> | null = null;
  private lines: string[] = [];
  private _url = "";
  private _port = 0;

  private constructor(private readonly options: ServerOptions) {
    this.token = options.token ?? `e2e-${Math.random().toString(36).slice(2)}${Date.now()}`;
    this.operatorToken = options.operatorToken ?? `e2e-op-${Math.random().toString(36).slice(2)}${Date.now()}`;
  }

  /** Starts a server on a free port and waits until it listens. */
  static async start(options: ServerOptions = {}): Promise<Server> {
    const server = new Server(options);
    await server.spawnUntilListening(0);
    return server;
  }

  /** `http://127.0.0.1:<port>`, without a trailing slash. */
  get url(): string {
    return this._url;
  }

  get port(): number {
    return this._port;
  }

  get running(): boolean {
    return this.child !== null;
  }

  /** The server's output so far (the most recent lines). */
  log(): string {
    return this.lines.join("\n");
  }

  /**
   * Stops the server: SIGTERM (graceful shutdown), then SIGKILL if it has
   * not exited after `STOP_TIMEOUT_MS`. With `"SIGKILL"` it dies at once,
   * like a crash.
   */
  async stop(signal: "SIGTERM" | "SIGKILL" = "SIGTERM"): Promise<Exit> {
    const child = this.child;
    const exited = this.exited;
    if (!child || !exited) return { code: null, signal: null, forced: false };
    child.kill(signal);
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), STOP_TIMEOUT_MS);
    });
    let result = await Promise.race([exited, timedOut]);
    clearTimeout(timer);
    if (result === "timeout") {
      child.kill("SIGKILL");
      result = { ...(await exited), forced: true };
    }
    this.child = null;
    this.exited = null;
    return result;
  }

  /** Sends `signal` to the running server: `SIGSTOP` freezes it, `SIGCONT` thaws it. */
  signal(signal: NodeJS.Signals): void {
    if (!this.child) throw new Error("the server is not running");
    this.child.kill(signal);
  }

  /** Stops the server and starts it again on the same port; its devices are gone. */
  async restart(signal: "SIGTERM" | "SIGKILL" = "SIGTERM"): Promise<Exit> {
    const exit = await this.stop(signal);
    await this.start();
    return exit;
  }

  /** Starts a stopped server again on the port it had. */
  async start(): Promise<void> {
    if (this.child) throw new Error("the server is already running");
    await this.spawnUntilListening(this._port);
  }

  /** `POST /api/devices/{id}/status` with the token; fails the test unless it is a 2xx. */
  async post(id: string, status: StatusUpdate): Promise<{ id: number; changed: boolean }> {
    const { status: code, body } = await request(
      "POST",
      `${this._url}/api/devices/${encodeURIComponent(id)}/status`,
      JSON.stringify(status),
      { authorization: `Bearer ${this.token}`, "content-type": "application/json" },
    );
    if (code < 200 || code > 299) {
      throw new Error(`POST status of ${id} answered ${code}: ${body}`);
    }
    return JSON.parse(body);
  }

  /**
   * `PUT /api/devices/{id}/thresholds` with the operator token, e.g.
   * `{ temperature: { max: 30 } }`; fails the test unless it is a 2xx.
   */
  async putThresholds(id: string, limits: Record<string, { min?: number; max?: number }>): Promise<void> {
    const { status: code, body } = await request(
      "PUT",
      `${this._url}/api/devices/${encodeURIComponent(id)}/thresholds`,
      JSON.stringify(limits),
      { authorization: `Bearer ${this.operatorToken}`, "content-type": "application/json" },
    );
    if (code < 200 || code > 299) {
      throw new Error(`PUT thresholds of ${id} answered ${code}: ${body}`);
    }
  }

  /** `GET /healthz` as JSON. */
  async health(): Promise<{ status: string; event_id: number; devices: number; subscribers: number }> {
    const { status, body } = await request("GET", `${this._url}/healthz`);
    if (status !== 200) throw new Error(`/healthz answered ${status}: ${body}`);
    return JSON.parse(body);
  }

  private args(port: number): string[] {
    const args = [
      "--addr",
      `127.0.0.1:${port}`,
      "--ingest-token",
      this.token,
      "--operator-token",
      this.operatorToken,
    ];
    if (this.options.simulator) {
      args.push("--simulator", "on", "--simulator-interval", this.options.simulator);
    } else {
      args.push("--no-simulator");
    }
    const extra = this.options.args ?? [];
    // Memory only, unless the test gives a data directory of its own: never
    // a `telltale-data` folder in the repository.
    if (!extra.includes("--data-dir")) args.push("--memory");
    return args.concat(extra);
  }

  private async spawnUntilListening(port: number): Promise<void> {
    if (!existsSync(BIN)) {
      throw new Error(
        `no server binary at ${BIN}: build it with \`cargo leptos build\` in the repository root ` +
          `(or set TELLTALE_BIN)`,
      );
    }
    // Right after a stop the port may still be held for a moment: retry.
    for (let attempt = 1; ; attempt++) {
      try {
        await this.spawnOnce(port);
        return;
      } catch (e) {
        const inUse = /address already in use|os error 98/i.test(String(e));
        if (port === 0 || !inUse || attempt >= 40) throw e;
        await new Promise((r) => setTimeout(r, 250));
      }
    }
  }

  private spawnOnce(port: number): Promise<void> {
    const env: NodeJS.ProcessEnv = { ...process.env, RUST_LOG: "info,tower_http=warn", NO_COLOR: "1" };
    // Not this server's business: options of `cargo leptos` runs and of the shell.
    for (const key of Object.keys(env)) {
      if (key.startsWith("TELLTALE_") || key === "LEPTOS_WATCH" || key === "LEPTOS_RELOAD_PORT") {
        delete env[key];
      }
    }
    const child = spawn(BIN, this.args(port), { cwd: REPO_DIR, env, stdio: ["ignore", "pipe", "pipe"] });
    this.child = child;
    alive.add(child);
    this.exited = new Promise<Exit>((resolve) => {
      child.once("exit", (code, signal) => {
        alive.delete(child);
        resolve({ code, signal, forced: false });
      });
    });

    return new Promise<void>((resolve, reject) => {
      let settled = false;
      const fail = (why: string) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        child.kill("SIGKILL");
        this.child = null;
        this.exited = null;
        reject(new Error(`${why}\n--- server output ---\n${this.log()}`));
      };
      const timer = setTimeout(
        () => fail(`the server did not print "listening on" within ${READY_TIMEOUT_MS} ms`),
        READY_TIMEOUT_MS,
      );
      const onLine = (line: string) => {
        this.lines.push(line);
        if (this.lines.length > LOG_LINES_KEPT) this.lines.shift();
        const m = /listening on (http:\/\/\S+)/.exec(line);
        if (m && !settled) {
          settled = true;
          clearTimeout(timer);
          const url = new URL(m[1]);
          this._url = url.origin;
          this._port = Number(url.port);
          resolve();
        }
      };
      // Both pipes are read for the server's whole life, or it would block
      // once a pipe's buffer is full.
      lines(child.stdout!, onLine);
      lines(child.stderr!, onLine);
      child.once("error", (e) => fail(`cannot start ${BIN}: ${e.message}`));
      // "close" comes after the output is read, so the reason is in the log.
      child.once("close", (code, signal) =>
        fail(`the server exited before listening (code ${code}, signal ${signal})`),
      );
    });
  }
}

/** What the ingest API accepts; fields left out keep their value. */
export interface StatusUpdate {
  temperature?: number;
  humidity?: number;
  power_on?: boolean;
  name?: string;
  metrics?: Record<string, number>;
}

function lines(stream: NodeJS.ReadableStream, onLine: (line: string) => void) {
  let rest = "";
  stream.setEncoding("utf8");
  stream.on("data", (chunk: string) => {
    rest += chunk;
    const parts = rest.split("\n");
    rest = parts.pop() ?? "";
    // Tracing may colour its output when told to; the text is what matters.
    for (const part of parts) onLine(part.replace(/\x1b\[[0-9;]*m/g, "").trimEnd());
  });
}

/**
 * One HTTP request on a fresh connection (no keep-alive pool), so a request
 * right after a restart never lands on a socket of the old process.
 */
function request(
  method: string,
  url: string,
  body?: string,
  headers: Record<string, string> = {},
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method, headers, agent: false, timeout: 10_000 }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (c: string) => (text += c));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body: text }));
      res.on("error", reject);
    });
    req.on("timeout", () => req.destroy(new Error(`${method} ${url} timed out`)));
    req.on("error", reject);
    if (body !== undefined) req.end(body);
    else req.end();
  });
}

/** How long a page may take to hydrate (and open its stream) on a busy machine. */
const HYDRATED_WITHIN_MS = 20_000;

/** The connection indicator, which reads exactly Live, Reconnecting… or Offline. */
export function indicator(page: Page) {
  return page.getByTestId("connection");
}

/** The card of one device. */
export function card(page: Page, id: string) {
  return page.locator(`article[data-testid="device"][data-device="${id}"]`);
}

/** Every power switch on the page (there are none without operator rights). */
export function switches(page: Page) {
  return page.getByTestId("power-switch");
}

/** Signs the page in as operator through its header form. */
export async function signIn(page: Page, token: string) {
  await page.getByTestId("operator-token").fill(token);
  const button = page.getByRole("button", { name: "Sign in" });
  // Enabled once the page is hydrated: a debug build's WebAssembly on a
  // busy 2-core machine was seen to take over 10 s.
  await expect(button).toBeEnabled({ timeout: HYDRATED_WITHIN_MS });
  await button.click();
}

/**
 * Waits for the page's event stream to be open. Only after this may a test
 * publish and expect to see the event: earlier, it may race the stream.
 */
export async function waitLive(page: Page, timeout = HYDRATED_WITHIN_MS) {
  await expect(indicator(page)).toHaveText("Live", { timeout });
}

/**
 * `test` with a fresh server per test (`server`), and `baseURL` pointing at
 * it, so `page.goto("/")` opens its dashboard. Options: `test.use({ serverOptions: … })`.
 * The server's output is attached to a failed test's report.
 */
export const test = base.extend<{ serverOptions: ServerOptions; server: Server }>({
  serverOptions: [{}, { option: true }],
  server: async ({ serverOptions }, use, testInfo) => {
    const server = await Server.start(serverOptions);
    try {
      await use(server);
    } finally {
      await server.stop();
      if (testInfo.status !== testInfo.expectedStatus) {
        await testInfo.attach("server.log", { body: server.log(), contentType: "text/plain" });
      }
    }
  },
  baseURL: async ({ server }, use) => {
    await use(server.url);
  },
});

export { expect };

/**
 * `test` with a server on a fresh temporary `--data-dir` (removed after the
 * test), for tests that need the stored history or a restart that keeps it.
 */
export const durableTest = test.extend<{ dataDir: string }>({
  dataDir: async ({}, use) => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "telltale-e2e-"));
    try {
      await use(dir);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  },
  serverOptions: async ({ dataDir }, use) => {
    await use({ args: ["--data-dir", dataDir] });
  },
});

/** The chart of one metric on a device page. */
export function chart(page: Page, metric: string) {
  return page.locator(`figure[data-testid="chart"][data-metric="${metric}"]`);
}

/** How many points the chart (or sparkline) `svg` draws. */
export async function pointsOf(svg: Locator): Promise<number> {
  return Number(await svg.getAttribute("data-points"));
}

/** A port that was free a moment ago, for a helper server of a test. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** Whether something accepts TCP connections on 127.0.0.1:`port`. */
export function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1");
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}
