// Drive Debian's Chromium (through playwright-core) the way a student uses the course.
//
//   node browser_test.mjs lesson --url <JupyterLab notebook URL with ?token=> --screenshot out.png
//       open a lesson in JupyterLab, Run > Run All Cells, wait for the kernel, drag the first
//       slider of the notebook and wait until the output of its cell changes.
//   node browser_test.mjs course --url <http://127.0.0.1:PORT/index.html> --screenshot out.png
//       open the rendered course with every non-local request blocked; visit each page and check
//       that MathJax typeset the formulas and the widget manager rendered the widgets.
//
// Prints one JSON object on the last line ({"ok": true|false, ...}); exit code 1 on failure.
// CHROMIUM overrides the browser executable (default: /usr/bin/chromium).

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const args = process.argv.slice(2);
const mode = args[0];
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
const url = opt("url");
const screenshot = opt("screenshot", "screenshot.png");
const timeoutMs = Number(opt("timeout", "240")) * 1000;
const log = (...a) => console.error(`[browser ${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);
const t0 = Date.now();

const FLAGS = [
  "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-dev-shm-usage",
];

function isLocal(u) {
  if (u.startsWith("data:") || u.startsWith("blob:") || u.startsWith("about:")) return true;
  try {
    const h = new URL(u).hostname;
    return h === "127.0.0.1" || h === "localhost" || h === "[::1]";
  } catch {
    return false;
  }
}

async function withBrowser(fn) {
  const profile = mkdtempSync(join(tmpdir(), "edgellm-chromium-")); // a new, empty profile
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: FLAGS,
    viewport: { width: 1400, height: 1000 },
  });
  const net = { blocked: [], failed: [], httpErrors: [], pageErrors: [] };
  // block everything that is not on this machine: the course must work offline
  await context.route("**/*", (route) => {
    const u = route.request().url();
    if (isLocal(u)) return route.continue();
    net.blocked.push(u);
    return route.abort("blockedbyclient");
  });
  context.on("requestfailed", (r) => {
    if (isLocal(r.url())) net.failed.push(`${r.url()} ${r.failure()?.errorText}`);
  });
  context.on("response", (r) => {
    if (r.status() >= 400) net.httpErrors.push(`${r.status()} ${r.url()}`);
  });
  try {
    return await fn(context, net);
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

// ------------------------------------------------------------------------------------------
// a lesson in JupyterLab

async function lesson(context, net) {
  const page = context.pages()[0] || (await context.newPage());
  page.on("pageerror", (e) => net.pageErrors.push(String(e)));
  page.setDefaultTimeout(60_000);
  log("opening", url.replace(/token=[^&]+/, "token=***"));
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first().waitFor();
  // wait for the kernel to be idle before running (status shown in the toolbar)
  await page.waitForFunction(() => {
    const el = document.querySelector(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator") ||
      document.querySelector(".jp-NotebookPanel-toolbar .jp-KernelStatus");
    const t = (el && (el.getAttribute("data-status") || el.textContent || "")) || "";
    return !/busy|starting|connecting|restarting|unknown/i.test(t) ;
  }, null, { timeout: 60_000 }).catch(() => log("kernel status indicator not found; going on"));
  await page.waitForTimeout(1500);

  log("Run > Run All Cells");
  await page.locator(".lm-MenuBar-itemLabel", { hasText: /^Run$/ }).click();
  await page.locator(".lm-Menu-itemLabel", { hasText: /^Run All Cells$/ }).click();

  // finished when every code cell has a number in its prompt ([3], not [*] or [ ]); a run that
  // stopped early (an error) leaves [ ] prompts with no [*] while the kernel is idle
  const state = () => page.evaluate(() => {
    const prompts = [...document.querySelectorAll(".jp-NotebookPanel .jp-CodeCell .jp-InputPrompt")]
      .map((p) => p.textContent.trim());
    const status = document.querySelector(".jp-StatusBar-Widget, #jp-main-statusbar");
    return { prompts, busy: prompts.some((p) => p.includes("*")),
             idle: /Idle/.test(status ? status.textContent : "") };
  });
  let done = false, quiet = 0, st;
  const runDeadline = Date.now() + timeoutMs;
  while (Date.now() < runDeadline) {
    await page.waitForTimeout(1000);
    st = await state();
    if (st.prompts.length && st.prompts.every((p) => /\[\d+\]/.test(p))) { done = true; break; }
    // idle with cells left, after at least one cell ran: it stopped (before the first cell runs,
    // a slow kernel start on a busy machine also reads as idle with every prompt empty)
    const started = st.prompts.some((p) => /\[\d+\]/.test(p));
    quiet = started && !st.busy && st.idle ? quiet + 1 : 0;
    if (quiet >= 15) break;                       // idle for 15 s with cells left: it stopped
  }
  const errors = await page.evaluate(() =>
    [...document.querySelectorAll(".jp-NotebookPanel .jp-OutputArea-output")]
      .map((e) => e.textContent).filter((t) => /Traceback|^\w*(Error|Exception)\b/m.test(t))
      .map((t) => t.trim().split("\n").slice(-1)[0].slice(0, 300)));
  log(`run all finished: ${done}, errors: ${errors.length}`);
  if (!done || errors.length) {
    await page.screenshot({ path: screenshot, fullPage: false });
    return { ok: false, reason: done ? "a cell raised an error" : "cells did not all finish",
             errors, prompts: st && st.prompts };
  }

  // the first slider of the notebook
  const slider = page.locator(".jp-NotebookPanel .widget-slider").first();
  if ((await slider.count()) === 0) return { ok: false, reason: "no slider widget rendered in JupyterLab" };
  await slider.scrollIntoViewIfNeeded();
  // the output area of the cell holding the slider, without the slider itself
  const signature = () => slider.evaluate((s) => {
    const el = s.closest(".jp-Cell");
    const out = el.querySelector(".jp-Cell-outputArea") || el;
    const copy = out.cloneNode(true);
    copy.querySelectorAll(".widget-slider, .widget-readout").forEach((s) => s.remove());
    const imgs = [...copy.querySelectorAll("img")].map((i) => i.getAttribute("src") || "");
    return { text: copy.textContent.replace(/\s+/g, " ").trim(),
             images: imgs.map((s) => `${s.length}:${s.slice(-64)}`) };
  });
  const readout = () => slider.locator(".widget-readout").first().evaluate(
    (e) => e.value ?? e.textContent).catch(() => null);
  const before = await signature();
  const valueBefore = await readout();

  // drag the handle like a person: press on it, move along the track, release
  const handle = slider.locator(".noUi-handle").first();
  const track = slider.locator(".noUi-base, .noUi-target, .slider").first();
  const hb = await handle.boundingBox();
  const tb = await track.boundingBox();
  if (!hb || !tb) return { ok: false, reason: "slider handle or track not visible" };
  const x0 = hb.x + hb.width / 2, y0 = hb.y + hb.height / 2;
  const frac = (x0 - tb.x) / tb.width;
  const x1 = tb.x + tb.width * (frac < 0.5 ? Math.min(frac + 0.35, 0.95) : Math.max(frac - 0.35, 0.05));
  await page.mouse.move(x0, y0);
  await page.mouse.down();
  await page.mouse.move(x1, y0, { steps: 12 });
  await page.mouse.up();
  const valueAfter = await readout();
  log(`slider moved: ${valueBefore} -> ${valueAfter}`);

  let after = before;
  const deadline = Date.now() + 120_000;
  while (Date.now() < deadline) {
    await page.waitForTimeout(500);
    after = await signature();
    if (JSON.stringify(after) !== JSON.stringify(before)) break;
  }
  // then let the view settle: the same output for 2 s in a row (a plot may redraw after the text)
  let stable = 0;
  while (Date.now() < deadline && stable < 4) {
    await page.waitForTimeout(500);
    const now = await signature();
    stable = JSON.stringify(now) === JSON.stringify(after) ? stable + 1 : 0;
    after = now;
  }
  await slider.scrollIntoViewIfNeeded();
  await page.screenshot({ path: screenshot, fullPage: false });
  const changed = JSON.stringify(after) !== JSON.stringify(before);
  return {
    ok: changed && valueBefore !== valueAfter,
    reason: changed ? (valueBefore !== valueAfter ? "" : "slider value did not change") :
      "the output of the slider's cell did not change",
    slider: { before: valueBefore, after: valueAfter },
    output: { before: before.text.slice(0, 300), after: after.text.slice(0, 300),
              imagesChanged: JSON.stringify(before.images) !== JSON.stringify(after.images) },
    // tqdm.auto progress bars drawn as widgets by JupyterLab's widget manager
    progressBars: await page.locator(".jp-NotebookPanel .widget-hprogress").count(),
    pageErrors: net.pageErrors.slice(0, 5),
  };
}

// ------------------------------------------------------------------------------------------
// the rendered course, offline

async function course(context, net) {
  const page = context.pages()[0] || (await context.newPage());
  page.on("pageerror", (e) => net.pageErrors.push(`${page.url()}: ${e}`));
  page.setDefaultTimeout(60_000);
  await page.goto(url, { waitUntil: "load" });
  const title = await page.title();
  const links = await page.$$eval("a[href$='.html']", (as) => [...new Set(as.map((a) => a.href))]);
  log(`index "${title}" with ${links.length} page links`);
  const pages = [];
  let shot = false;
  for (const link of links) {
    const resp = await page.goto(link, { waitUntil: "load" });
    // formulas in the page as served (before MathJax replaces them): $...$, $$...$$ or \(...\)
    const source = ((await resp.text()) || "").replace(/<script[\s\S]*?<\/script>/g, "");
    const hasMath = /\$[^$\s<][^$<]*\$|\\\(/.test(source);
    await page.waitForLoadState("networkidle").catch(() => {});
    const info = await page.evaluate((hasMath) => ({
      hasMath,
      widgetState: !!document.querySelector("script[type='application/vnd.jupyter.widget-state+json']"),
      widgetViews: document.querySelectorAll("script[type='application/vnd.jupyter.widget-view+json']").length,
      brokenImages: [...document.images].filter((i) => i.complete && i.naturalWidth === 0).map((i) => (i.src || "").slice(0, 80)),
    }), hasMath);
    let mathOk = true, widgetsOk = true;
    if (info.hasMath) {
      mathOk = await page.waitForFunction(() => window.MathJax && window.MathJax.Hub &&
        document.querySelectorAll(".MathJax_CHTML, .mjx-chtml, mjx-container").length > 0,
        null, { timeout: 30_000 }).then(() => true, () => false);
      // let MathJax finish its queue and its web fonts before leaving the page: leaving earlier
      // aborts the font requests in flight, which would read as failed requests
      await page.evaluate(() => new Promise((done) => window.MathJax.Hub.Queue(done)))
        .catch(() => {});
      await page.evaluate(() => document.fonts.ready.then(() => true)).catch(() => {});
      await page.waitForLoadState("networkidle").catch(() => {});
    }
    if (info.widgetState && info.widgetViews) {
      widgetsOk = await page.waitForFunction(() =>
        document.querySelectorAll(".jupyter-widgets, .widget-slider, .widget-hprogress").length > 0,
        null, { timeout: 30_000 }).then(() => true, () => false);
    }
    const entry = { url: link.replace(/^.*?\/\/[^/]+/, ""), ...info, mathOk, widgetsOk,
                    mathjaxLoaded: await page.evaluate(() => !!(window.MathJax && window.MathJax.Hub)) };
    pages.push(entry);
    log(JSON.stringify(entry));
    if (!shot && (info.widgetViews || info.hasMath)) {
      await page.screenshot({ path: screenshot, fullPage: false });
      shot = true;
    }
  }
  if (!shot) {
    await page.goto(url, { waitUntil: "load" });
    await page.screenshot({ path: screenshot, fullPage: false });
  }
  const bad = pages.filter((p) => !p.mathOk || !p.widgetsOk || p.brokenImages.length);
  const ok = links.length > 0 && !bad.length && !net.blocked.length && !net.failed.length &&
    !net.httpErrors.length;
  return { ok, title, pages, bad, blocked: net.blocked, failed: net.failed,
           httpErrors: net.httpErrors, pageErrors: net.pageErrors.slice(0, 10),
           reason: ok ? "" : "see bad / blocked / failed / httpErrors" };
}

const modes = { lesson, course };
if (!modes[mode] || !url) {
  console.error("usage: node browser_test.mjs lesson|course --url URL [--screenshot PATH] [--timeout S]");
  process.exit(2);
}
let result;
try {
  result = await withBrowser(modes[mode]);
} catch (e) {
  result = { ok: false, reason: `exception: ${e && e.stack ? e.stack : e}` };
}
result.seconds = (Date.now() - t0) / 1000;
result.screenshot = screenshot;
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
