// A real OpenID Connect provider for the test suite: the certified `oidc-provider` package, on 127.0.0.1,
// with its built-in development login form (any login, any password) and no consent screen.
// tests/oidc_provider.py starts it; by hand:
//   OIDC_CLIENT_ID=portal OIDC_CLIENT_SECRET=s3cret OIDC_REDIRECT_URIS=http://127.0.0.1:8000/portal/callback \
//   OIDC_ACCOUNTS='{"alice": {"email": "alice@example.edu", "email_verified": true, "groups": ["staff"]}}' \
//   node oidc.mjs
// Environment:
//   OIDC_PORT           port on 127.0.0.1; 0 or unset = any free port
//   OIDC_CLIENT_ID      the one registered client (client_secret_basic, authorization_code, code, PKCE S256)
//   OIDC_CLIENT_SECRET
//   OIDC_REDIRECT_URIS  comma-separated
//   OIDC_ACCOUNTS       JSON object: login name -> claims; sub is the login name, preferred_username defaults
//                       to it. Logins not listed still sign in, with sub and preferred_username only.
// When listening it writes one JSON line to stdout, {"issuer": "http://127.0.0.1:PORT"}; everything else the
// package says (warnings, notices) goes to stderr. SIGTERM, SIGINT or EOF on stdin close the server and exit 0.
import * as crypto from "node:crypto";
import * as http from "node:http";

import Provider from "oidc-provider";

// oidc-provider prints notices with console.info (stdout); keep stdout for the one JSON line.
console.info = (...args) => console.error(...args);
console.log = (...args) => console.error(...args);

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`oidc.mjs: ${name} is required`);
    process.exit(2);
  }
  return value;
}

const port = Number(process.env.OIDC_PORT ?? "0");
const clientId = required("OIDC_CLIENT_ID");
const clientSecret = required("OIDC_CLIENT_SECRET");
const redirectUris = required("OIDC_REDIRECT_URIS")
  .split(",")
  .map((uri) => uri.trim())
  .filter(Boolean);
const accounts = JSON.parse(process.env.OIDC_ACCOUNTS ?? "{}");
if (accounts === null || typeof accounts !== "object" || Array.isArray(accounts)) {
  console.error("oidc.mjs: OIDC_ACCOUNTS must be a JSON object (login name -> claims)");
  process.exit(2);
}

// One RSA signing key per run (RS256, the algorithm every relying party supports), published at jwks_uri.
const { privateKey } = crypto.generateKeyPairSync("rsa", { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: "jwk" }), kid: crypto.randomUUID(), use: "sig", alg: "RS256" };

// The issuer carries the port, which is only known once listening: bind first, then build the provider.
const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once("error", reject);
  server.listen(port, "127.0.0.1", resolve);
});
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: clientId,
      client_secret: clientSecret,
      redirect_uris: redirectUris,
      token_endpoint_auth_method: "client_secret_basic",
      grant_types: ["authorization_code"],
      response_types: ["code"],
    },
  ],
  jwks: { keys: [signingKey] },
  cookies: { keys: [crypto.randomBytes(32).toString("hex")] },
  scopes: ["openid", "email", "profile", "groups"],
  claims: {
    openid: ["sub"],
    email: ["email", "email_verified"],
    profile: ["preferred_username", "name"],
    groups: ["groups"],
  },
  // v9 only requires PKCE for public clients by default; require it (S256, the only method v9 accepts) here too.
  pkce: { required: () => true },
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, sub) {
    const known = Object.hasOwn(accounts, sub) ? accounts[sub] : {};
    return {
      accountId: sub,
      // oidc-provider filters these by the granted scopes/claims, and for the ID token vs userinfo.
      async claims() {
        return { preferred_username: sub, ...known, sub };
      },
    };
  },
  // No consent screen: the documented loadExistingGrant recipe, granting whatever OIDC scopes and claims
  // the request asked for the first time this client is seen in the session.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) {
      return ctx.oidc.provider.Grant.find(grantId);
    }
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope([...ctx.oidc.requestParamOIDCScopes].join(" "));
    grant.addOIDCClaims([...ctx.oidc.requestParamClaims]);
    await grant.save();
    return grant;
  },
});

provider.on("server_error", (ctx, error) => console.error("oidc.mjs server_error:", error));

// Static clients are only checked when first used; check now, so a bad redirect URI fails the start, not a test.
try {
  if (!(await provider.Client.find(clientId))) throw new Error(`client ${clientId} not found`);
} catch (error) {
  console.error(`oidc.mjs: invalid client configuration: ${error.message} ${error.error_description ?? ""}`);
  process.exit(2);
}

server.on("request", provider.callback());

let closing = false;
function shutdown() {
  if (closing) return;
  closing = true;
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
// The parent (tests/oidc_provider.py) holds our stdin open; EOF means it is gone, so go too and leave no orphan.
process.stdin.on("end", shutdown);
process.stdin.resume();

process.stdout.write(`${JSON.stringify({ issuer })}\n`);
