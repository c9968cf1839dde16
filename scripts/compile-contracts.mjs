#!/usr/bin/env node
// Compile each contract of CONTRACTS (contracts/<Name>.sol, one self-contained source file each) with
// solc-js into contracts/build/<Name>.json.
//
// Usage (from anywhere):
//   node scripts/compile-contracts.mjs          # (re)write the build artifact(s)
//   node scripts/compile-contracts.mjs --check  # compile in memory; exit 1 if the committed
//                                               # artifact differs from a fresh compile
//
// The output is deterministic: no metadata hash / CBOR trailer in the bytecode, keys sorted,
// 2-space indentation and a trailing newline.

import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
// `runtime: true` also records the deployed (runtime) bytecode, for contracts the devnet places at a
// fixed address with anvil_setCode instead of deploying them (tollway.devnet.canonical).
const CONTRACTS = [
  { name: "TestUSDC" },
  { name: "Permit2", runtime: true },
  { name: "X402UptoPermit2Proxy", runtime: true },
  { name: "X402BatchSettlement", runtime: true },
  { name: "ERC3009DepositCollector", runtime: true },
  { name: "Permit2DepositCollector", runtime: true },
  { name: "Multicall3", runtime: true },
];
const SOLC_DIR = join(ROOT, ".tools", "node_modules", "solc");

if (!existsSync(SOLC_DIR)) {
  console.error(`solc-js not found at ${SOLC_DIR}; run scripts/compile-contracts (it installs it)`);
  process.exit(2);
}
const solc = createRequire(join(ROOT, ".tools", "package.json"))("solc");

/** Recursively sort object keys so JSON.stringify output is canonical. */
function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value && typeof value === "object") {
    return Object.fromEntries(
      Object.keys(value)
        .sort()
        .map((k) => [k, sortKeys(value[k])]),
    );
  }
  return value;
}

function compile({ name, runtime = false }) {
  const sourcePath = join(ROOT, "contracts", `${name}.sol`);
  const sourceBytes = readFileSync(sourcePath);
  const unit = `contracts/${name}.sol`;
  const input = {
    language: "Solidity",
    sources: { [unit]: { content: sourceBytes.toString("utf8") } },
    settings: {
      optimizer: { enabled: true, runs: 200 },
      evmVersion: "cancun",
      metadata: { bytecodeHash: "none", appendCBOR: false },
      outputSelection: {
        [unit]: { [name]: ["abi", "evm.bytecode.object", ...(runtime ? ["evm.deployedBytecode.object"] : [])] },
      },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const errors = (output.errors || []).filter((e) => e.severity === "error");
  for (const e of output.errors || []) console.error(e.formattedMessage || e.message);
  if (errors.length) throw new Error(`compilation of ${unit} failed`);
  const contract = output.contracts[unit][name];
  const artifact = {
    contractName: name,
    compiler: solc.version(),
    sourceSha256: createHash("sha256").update(sourceBytes).digest("hex"),
    abi: contract.abi,
    bytecode: `0x${contract.evm.bytecode.object}`,
  };
  if (runtime) artifact.deployedBytecode = `0x${contract.evm.deployedBytecode.object}`;
  return JSON.stringify(sortKeys(artifact), null, 2) + "\n";
}

/** Short human-readable explanation of how two artifact texts differ. */
function describeDiff(committed, fresh) {
  let a;
  try {
    a = JSON.parse(committed);
  } catch {
    return "  committed file is not valid JSON";
  }
  const b = JSON.parse(fresh);
  const lines = [];
  for (const key of new Set([...Object.keys(a), ...Object.keys(b)])) {
    const x = JSON.stringify(a[key]);
    const y = JSON.stringify(b[key]);
    if (x === y) continue;
    if (x === undefined || y === undefined) {
      lines.push(`  ${key}: ${x === undefined ? "missing from committed file" : "unexpected in committed file"}`);
      continue;
    }
    // Show ~80 characters around the first differing position.
    let i = 0;
    while (i < x.length && i < y.length && x[i] === y[i]) i++;
    const start = Math.max(0, i - 20);
    const clip = (s) => `${start ? "…" : ""}${s.slice(start, start + 80)}${s.length > start + 80 ? "…" : ""}`;
    lines.push(`  ${key} (first difference at char ${i}):\n    committed: ${clip(x)}\n    fresh:     ${clip(y)}`);
  }
  if (!lines.length) lines.push("  (formatting differs only)");
  return lines.join("\n");
}

const check = process.argv.includes("--check");
let failed = false;
for (const contract of CONTRACTS) {
  const { name } = contract;
  const outPath = join(ROOT, "contracts", "build", `${name}.json`);
  const fresh = compile(contract);
  const rel = relative(ROOT, outPath);
  if (check) {
    const committed = existsSync(outPath) ? readFileSync(outPath, "utf8") : "";
    if (committed !== fresh) {
      failed = true;
      console.error(`${rel} is out of date (run scripts/compile-contracts):`);
      console.error(committed ? describeDiff(committed, fresh) : "  file is missing");
    } else {
      console.log(`${rel} is up to date`);
    }
  } else {
    mkdirSync(dirname(outPath), { recursive: true });
    writeFileSync(outPath, fresh);
    console.log(`wrote ${rel}`);
  }
}
process.exit(failed ? 1 : 0);
