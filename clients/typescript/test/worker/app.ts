// The Worker the workerd tests run: a Hono app with the source system's one-line
// middleware, bundled by esbuild for the browser platform (no Node built-ins allowed).
import { Hono } from "hono";
import { versionCheckMiddleware } from "../../src/index.js";

const app = new Hono();
app.use("*", versionCheckMiddleware("op-auth"));
app.get("/", (c) => c.text("ok"));
app.get("/health", (c) => c.text("healthy"));

export default app;
