// node oidc-provider (an OpenID Certified provider) as the upstream OP of the broker's tests.
//
// Usage: node server.mjs [config.json]   (or the JSON in $OP_CONFIG)
// Prints "ready <port>" once it accepts connections on 127.0.0.1:<port>.
//
// Config (JSON):
//   port                     required; the OP listens on 127.0.0.1:port
//   issuer                   default http://127.0.0.1:<port>
//   clients                  [{client_id, client_secret?, redirect_uris, id_token_alg?}]
//                            a client without a secret is public (token_endpoint_auth_method none)
//   accounts                 [{login, password, sub, email?, name?, groups?,
//                              eduperson_scoped_affiliation?, acr?, amr?}]
//   conform_id_token_claims  default true: scope claims (email, groups, ...) only at userinfo;
//                            false puts them into the ID token as well
//   extra_params             authorization request parameters the OP accepts (idp hints)
//
// What a relying party sees: discovery, JWKS (fresh RS256 and ES256 keys per run), the code
// flow with PKCE required, RFC 9207 `iss` in authorization responses, userinfo, refresh
// tokens for every client allowed the refresh_token grant (rotated on each use), and the
// scope `groups` releasing the claims `groups` and `eduperson_scoped_affiliation`.
//
// Sign-in is scriptable: devInteractions renders a plain HTML form (fields `login`,
// `password`) and then a consent form; both post to /interaction/<uid>. The login post is
// handled here so that the password is checked against `accounts` (devInteractions would take
// any) and the account's acr/amr become the session's.
import { readFileSync } from 'node:fs';
import { generateKeyPairSync, randomBytes } from 'node:crypto';

import Provider from 'oidc-provider';

const source = process.argv[2] ? readFileSync(process.argv[2], 'utf8') : process.env.OP_CONFIG;
if (!source) {
  process.stderr.write('usage: node server.mjs config.json (or OP_CONFIG=<json>)\n');
  process.exit(2);
}
const config = JSON.parse(source);
const port = Number(config.port);
const issuer = config.issuer || `http://127.0.0.1:${port}`;

const accounts = new Map((config.accounts || []).map((a) => [a.login, a]));
const bySub = new Map((config.accounts || []).map((a) => [a.sub, a]));

function jwk(kind, options, alg, kid) {
  const { privateKey } = generateKeyPairSync(kind, options);
  return { ...privateKey.export({ format: 'jwk' }), kid, alg, use: 'sig' };
}

const keys = [
  jwk('rsa', { modulusLength: 2048 }, 'RS256', `rs-${randomBytes(4).toString('hex')}`),
  jwk('ec', { namedCurve: 'P-256' }, 'ES256', `es-${randomBytes(4).toString('hex')}`),
];

const acrValues = [...new Set((config.accounts || []).map((a) => a.acr).filter(Boolean))];

const provider = new Provider(issuer, {
  clients: (config.clients || []).map((c) => ({
    client_id: c.client_id,
    ...(c.client_secret
      ? { client_secret: c.client_secret, token_endpoint_auth_method: 'client_secret_basic' }
      : { token_endpoint_auth_method: 'none' }),
    redirect_uris: c.redirect_uris,
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    id_token_signed_response_alg: c.id_token_alg || 'RS256',
  })),
  jwks: { keys },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  acrValues,
  claims: {
    acr: null,
    amr: null,
    auth_time: null,
    sid: null,
    iss: null,
    // acr, amr and auth_time ride on the openid scope: oidc-provider otherwise releases them
    // only when asked for through acr_values / max_age / the claims parameter.
    openid: ['sub', 'acr', 'amr', 'auth_time'],
    profile: ['name'],
    email: ['email', 'email_verified'],
    groups: ['groups', 'eduperson_scoped_affiliation'],
  },
  scopes: ['openid', 'offline_access', 'profile', 'email', 'groups'],
  conformIdTokenClaims: config.conform_id_token_claims !== false,
  extraParams: config.extra_params || [],
  pkce: { required: () => true },
  // Every client allowed the grant gets a refresh token (not only with offline_access), and
  // each use rotates it, so a relying party must store the new one.
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  rotateRefreshToken: true,
  ttl: { AccessToken: 600, IdToken: 600, RefreshToken: 3600, Grant: 3600 },
  features: { devInteractions: { enabled: true }, userinfo: { enabled: true } },
  async findAccount(ctx, id) {
    const account = bySub.get(id);
    if (!account) {
      return undefined;
    }
    return {
      accountId: id,
      async claims() {
        return {
          sub: account.sub,
          name: account.name,
          email: account.email,
          email_verified: Boolean(account.email),
          groups: account.groups,
          eduperson_scoped_affiliation: account.eduperson_scoped_affiliation,
        };
      },
    };
  },
});

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 16384) {
      throw new Error('form too large');
    }
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function loginAgain(uid) {
  return '<!DOCTYPE html><html><head><title>Sign-in</title></head><body>'
    + '<p class="error">Invalid login or password.</p>'
    + `<form autocomplete="off" action="/interaction/${encodeURIComponent(uid)}" method="post">`
    + '<input type="hidden" name="prompt" value="login"/>'
    + '<input required type="text" name="login" placeholder="login">'
    + '<input required type="password" name="password" placeholder="password">'
    + '<button type="submit" class="login login-submit">Sign-in</button></form></body></html>';
}

// The login post of devInteractions, with a password check; the consent post goes on to
// devInteractions with the form already parsed (oidc-provider reads `req.body` then).
provider.use(async (ctx, next) => {
  const match = /^\/interaction\/([^/]+)$/.exec(ctx.path);
  if (ctx.method !== 'POST' || !match) {
    return next();
  }
  const form = await readForm(ctx.req);
  if (form.get('prompt') !== 'login') {
    ctx.req.body = Object.fromEntries(form);
    return next();
  }
  const account = accounts.get(form.get('login'));
  if (!account || account.password !== form.get('password')) {
    ctx.status = 401;
    ctx.type = 'html';
    ctx.body = loginAgain(match[1]);
    return undefined;
  }
  ctx.respond = false;
  const login = { accountId: account.sub, acr: account.acr, amr: account.amr };
  await provider.interactionFinished(ctx.req, ctx.res, { login }, {
    mergeWithLastSubmission: false,
  });
  return undefined;
});

const server = provider.listen(port, '127.0.0.1', () => {
  process.stdout.write(`ready ${port}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.closeAllConnections?.();
    server.close(() => process.exit(0));
  });
}
