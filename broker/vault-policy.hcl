# Vault / OpenBao policy "binder-broker": everything the broker needs, nothing more.
#
# Attach it (alone; Vault adds "default") to the broker's AppRole:
#   bao policy write binder-broker vault-policy.hcl
#   bao write auth/approle/role/binder-broker token_policies=binder-broker \
#       token_ttl=1h token_max_ttl=24h
# Assumes a KV v2 mount at "secret" and a transit mount at "transit"; change the path
# prefixes below if yours differ.
#
# Vault matches "*" only at the END of a path, as a prefix glob: "transit/keys/binder-broker-*"
# also covers "transit/keys/binder-broker-x/rotate", and a "*" in the middle of a path is a
# literal character that matches nothing. So there is no separate rule for rotate or for
# sign with the hash in the URL; both are covered by the globs below.

# Broker secrets (upstream client secrets, app keys, per-user secrets), KV v2 data.
# create/update: new versions and check-and-set writes; read: the latest version.
path "secret/data/binder-broker/*" {
  capabilities = ["create", "read", "update"]
}

# KV v2 metadata: read versions, list keys, and delete a secret with all its versions.
path "secret/metadata/binder-broker/*" {
  capabilities = ["read", "list", "delete"]
}

# Transit signing keys named binder-broker-*.
# create/update: creating a key is a POST that transit authorises as "update"; read: the
# public keys for JWKS; update on the subpaths: "<key>/rotate" for key rotation.
# Because the glob cannot stop at the key name, this also allows "<key>/config" and
# "<key>/trim" on the broker's own keys. That cannot leak key material: exporting, backup
# and deletion live on other paths (transit/export, transit/backup, delete capability),
# none of which are granted here.
path "transit/keys/binder-broker-*" {
  capabilities = ["create", "read", "update"]
}

# Signing with those keys, including "transit/sign/<key>/<hash>". No encrypt, decrypt,
# verify, hmac, export or backup.
path "transit/sign/binder-broker-*" {
  capabilities = ["update"]
}

# The broker checks its own token (health) and renews it before it expires. The "default"
# policy grants these as well; they are listed so this policy stands on its own.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}
