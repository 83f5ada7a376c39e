// The console's partition flags, run under Node by tests/js_sdk.rs.
import assert from "node:assert/strict";
import { partitionFlag } from "./console.js";

const p = (leader, replicas, placement) => ({ partition: 0, leader, replicas, placement });
assert.equal(partitionFlag(p("n0", ["n0", "n1", "n2"], ["n2", "n1", "n0"]), 3), "");
assert.equal(partitionFlag(p(null, ["n0", "n1", "n2"], ["n0", "n1", "n2"]), 3), "leaderless");
assert.equal(partitionFlag(p("n0", ["n0", "n1"], ["n0", "n1", "n2"]), 3), "under");
assert.equal(partitionFlag(p("n0", ["n0", "n1", "n3"], ["n0", "n1", "n2"]), 3), "under");
assert.equal(partitionFlag(p("n0", ["n0"], []), 1), "");
console.log("console flags ok");
