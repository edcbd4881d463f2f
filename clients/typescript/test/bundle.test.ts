// The package is plain ESM a Worker bundler accepts: the built files import only each
// other, and an esbuild bundle of the entry for the browser platform (where any Node
// built-in fails to resolve) succeeds.
import { build } from "esbuild";
import { readFileSync, readdirSync } from "node:fs";
import { expect, test } from "vitest";

const dist = new URL("../dist/", import.meta.url).pathname;

test("the built package imports nothing but its own files", () => {
  const files = readdirSync(dist).filter((f) => f.endsWith(".js"));
  expect(files).toContain("index.js");
  for (const f of files) {
    const text = readFileSync(dist + f, "utf8");
    const specifiers = [...text.matchAll(/(?:import|export)[^'"]*?from\s*["']([^"']+)["']|import\(\s*["']([^"']+)["']\s*\)/g)].map(
      (m) => m[1] ?? m[2],
    );
    for (const s of specifiers) expect(s, `${f} imports ${s}`).toMatch(/^\.\/[\w-]+\.js$/);
    expect(text, f).not.toMatch(/\brequire\(/);
    expect(text, f).not.toMatch(/\bprocess\./);
  }
});

test("a Worker bundle of the entry needs no Node built-in", async () => {
  const out = await build({
    entryPoints: [dist + "index.js"],
    bundle: true,
    format: "esm",
    platform: "browser",
    conditions: ["workerd", "worker", "browser"],
    write: false,
    logLevel: "silent",
    metafile: true,
  });
  expect(out.errors).toEqual([]);
  const inputs = Object.keys(out.metafile.inputs);
  expect(inputs.every((i) => i.startsWith("dist/") || i.includes("/dist/"))).toBe(true);
  expect(out.outputFiles[0]?.text).not.toMatch(/from\s*["']node:/);
});
