// The official MPP JavaScript client, mppx, unmodified, paying a tollway: Mppx.create with the evm
// charge method, which answers a 402 carrying a `WWW-Authenticate: Payment` challenge with an
// EIP-3009 authorization (no chain access needed). npm, pinned by ./scripts/setup --test into
// .tools/mpp (its own prefix: mppx 0.11.0 needs a newer viem than the x402 client in .tools).
//
// Run with NODE_PATH=.tools/mpp/node_modules. POSTs --body to --url --repeat times through one
// client, then prints one JSON line: {"calls": [{status, payment_receipt, body, headers}, ...]}.
// If the client throws, it prints {"error": "<type>: <message>", "calls": [the calls done before]}
// and exits 0.
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";

// mppx is ESM only, which require() cannot load on Node 20 and import() does not look up through
// NODE_PATH: resolve the file through NODE_PATH, then import it.
const require = createRequire(import.meta.url);
const load = (name) => import(pathToFileURL(require.resolve(name)).href);
const { Mppx } = await load("mppx/client");
const { charge } = await load("mppx/evm/client");
const { privateKeyToAccount } = await load("viem/accounts");

const HEADERS = ["www-authenticate", "payment-receipt", "x-tollway-receipt", "x-tollway-cost", "content-type"];
const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    key: { type: "string" },
    "chain-id": { type: "string" },
    token: { type: "string" },
    "token-name": { type: "string" },
    "token-version": { type: "string" },
    body: { type: "string" },
    "max-amount": { type: "string", default: "10000000" }, // atomic units
    decimals: { type: "string", default: "6" }, // unused by mppx here; accepted like mpp_pympp.py
    repeat: { type: "string", default: "1" },
  },
});
for (const name of ["url", "key", "chain-id", "token", "token-name", "token-version", "body"]) {
  if (!args[name]) throw new Error(`--${name} is required`);
}
const repeat = Number(args.repeat);
if (!Number.isInteger(repeat) || repeat < 1) throw new Error("--repeat must be an integer >= 1");
const chainId = Number(args["chain-id"]);

const mppx = Mppx.create({
  polyfill: false, // the default replaces globalThis.fetch
  methods: [
    charge({
      account: privateKeyToAccount(args.key),
      authorization: { name: args["token-name"], version: args["token-version"] },
      networks: [chainId], // allow-lists; a raw token address needs its network listed
      currencies: [args.token],
      maxAtomicAmount: args["max-amount"],
    }),
  ],
});

async function seen(response) {
  const text = await response.text(); // a stream is read to its end
  let body = text;
  try {
    body = JSON.parse(text);
  } catch {}
  const headers = Object.fromEntries(HEADERS.map((name) => [name, response.headers.get(name)]));
  return { status: response.status, payment_receipt: response.headers.get("payment-receipt"), body, headers };
}

const calls = [];
let out;
try {
  for (let i = 0; i < repeat; i++) {
    const response = await mppx.fetch(args.url, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: args.body, // sent as given: the server's challenge digest is over these bytes
    });
    calls.push(await seen(response));
  }
  out = { calls };
} catch (e) {
  // undici's "fetch failed" says why only in its cause
  const cause = e?.cause ? ` (${e.cause.message ?? e.cause})` : "";
  out = { error: `${e?.name ?? typeof e}: ${e?.message ?? e}${cause}`, calls };
}
console.log(JSON.stringify(out));
