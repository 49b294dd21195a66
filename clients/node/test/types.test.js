// index.d.ts against index.js, as far as Node alone can check it: every value the
// declarations name is exported, and nothing exported is left undeclared. (The types
// themselves need a TypeScript compiler, which this package does not depend on.)

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import * as runtime from "../index.js";

test("index.d.ts declares exactly the values index.js exports", () => {
  const dts = readFileSync(new URL("../index.d.ts", import.meta.url), "utf8");
  const declared = [...dts.matchAll(/^export declare (?:const|class|function) (\w+)/gm)].map((m) => m[1]);
  assert.deepEqual(declared.sort(), Object.keys(runtime).sort());
});
