// The official x402 JavaScript client, unmodified, paying a tollway: @x402/fetch's
// wrapFetchWithPayment, @x402/evm's UptoEvmScheme and, signing in, @x402/extensions'
// sign-in-with-x client extension (npm, pinned by ./scripts/setup --test into .tools).
//
// Run with NODE_PATH=.tools/node_modules. Prints one JSON line: what the call got, and every
// request the client sent.
//
// Scenarios:
//   pay     one call, paid with upto
//   stream  the same, streamed ("stream": true in the body); the whole SSE body is returned
//   siwx    the sign-in-with-x extension registered too: a wallet whose credit covers the call is
//           served signed in, with no payment
import { createRequire } from "node:module";
import { parseArgs } from "node:util";

const require = createRequire(import.meta.url); // resolves through NODE_PATH
const { wrapFetchWithPayment, x402Client } = require("@x402/fetch");
const { toClientEvmSigner } = require("@x402/evm");
const { UptoEvmScheme } = require("@x402/evm/upto/client");
const { createSIWxClientExtension } = require("@x402/extensions/sign-in-with-x");
const { createPublicClient, http } = require("viem");
const { privateKeyToAccount } = require("viem/accounts");

const SCENARIOS = ["pay", "stream", "siwx"];
const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    key: { type: "string" },
    "chain-id": { type: "string" },
    token: { type: "string" },
    "rpc-url": { type: "string" },
    scenario: { type: "string" },
    body: { type: "string" },
  },
});
for (const name of ["url", "key", "chain-id", "token", "rpc-url", "scenario", "body"]) {
  if (!args[name]) throw new Error(`--${name} is required`);
}
if (!SCENARIOS.includes(args.scenario)) throw new Error(`--scenario is one of ${SCENARIOS.join(", ")}`);

const network = `eip155:${args["chain-id"]}`;
const account = privateKeyToAccount(args.key);
const reader = createPublicClient({ transport: http(args["rpc-url"]) }); // the Permit2 allowance, read by the scheme
const client = new x402Client()
  .register(network, new UptoEvmScheme(toClientEvmSigner(account, reader)))
  // the devnet token is no default asset: it must be allowed explicitly
  .setSpendControls({ allowedAssets: [{ network, asset: args.token, maxAmountPerPayment: "1000000" }] });
if (args.scenario === "siwx") {
  client.registerExtension(createSIWxClientExtension({ signers: [account] }));
}

const sent = [];
async function recordingFetch(input, init) {
  const request = new Request(input, init);
  const response = await fetch(request);
  sent.push({
    sign_in: request.headers.has("sign-in-with-x"),
    payment_signature: request.headers.has("payment-signature"),
    status: response.status,
  });
  return response;
}

const payingFetch = wrapFetchWithPayment(recordingFetch, client);
const response = await payingFetch(`${args.url}/v1/chat/completions`, {
  method: "POST",
  headers: { "content-type": "application/json" },
  body: args.body,
});
const body = await response.text(); // a stream is read to its end
const call = { status: response.status, headers: Object.fromEntries(response.headers), body };
console.log(JSON.stringify({ scenario: args.scenario, call, sent }));
