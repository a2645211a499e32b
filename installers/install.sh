#!/usr/bin/env bash
# Hearth offline installer. Run it from an unpacked bundle (`hearth bundle` builds one):
#
#   tar xf hearth-bundle.tar && sudo hearth-bundle/install.sh
#
# It needs no network: it checks every file against manifest.json (sha256sum) and refuses to go
# on if one was altered, creates a venv, installs the bundled wheels (pip --no-index, at the
# versions of the bundle's lock file), installs the bundled models into the catalogue, writes
# /etc/hearth/hearth.env (kept on upgrade), and installs and starts a hardened systemd unit, then
# waits for /health and prints the URL. Where systemd is not running (a container), it says so and
# prints how to start Hearth by hand.
# Running it again upgrades in place: config and models are kept. See installers/uninstall.sh.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: install.sh [--prefix DIR] [--host ADDR] [--port N] [--python PYTHON] [--user NAME]
                  [--no-systemd] [--wait SECONDS]
                  [--tls [--tls-name HOST]... | --tls-cert FILE --tls-key FILE]

  --prefix DIR    install under DIR (DIR/opt/hearth, DIR/etc/hearth, DIR/var/lib/hearth);
                  no user is created and no service started (for staging and tests)
  --host ADDR     address the server binds (default 127.0.0.1; 0.0.0.0 for the network)
  --port N        port (default 8000); --host/--port only apply to a new hearth.env
  --python PY     the Python to build the venv with (default python3; must match the bundle)
  --user NAME     the service's system user (default hearth)
  --no-systemd    do not install or start the systemd unit
  --wait SECONDS  how long to wait for /health after starting the service (default 300)
  --tls           serve HTTPS with a self-signed certificate made now (`hearth cert`) in
                  /etc/hearth/tls; its SHA-256 fingerprint is printed for clients to compare
  --tls-name HOST a name or address clients use for the certificate (repeatable; default: this
                  host's name, localhost, 127.0.0.1)
  --tls-cert FILE, --tls-key FILE
                  serve HTTPS with this certificate and key (copied to /etc/hearth/tls)
EOF
}

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

BUNDLE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX="" HOST=127.0.0.1 PORT=8000 PYTHON=python3 SERVICE_USER=hearth SYSTEMD=auto WAIT=300
TLS=no TLS_CERT="" TLS_KEY="" TLS_NAMES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$(realpath -m "$2"); shift 2 ;;
        --host) HOST=${2:?--host needs an address}; shift 2 ;;
        --port) PORT=${2:?--port needs a number}; shift 2 ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        --user) SERVICE_USER=${2:?--user needs a name}; shift 2 ;;
        --wait) WAIT=${2:?--wait needs seconds}; shift 2 ;;
        --no-systemd) SYSTEMD=no; shift ;;
        --tls) TLS=self-signed; shift ;;
        --tls-name) TLS_NAMES+=("${2:?--tls-name needs a host name or address}"); shift 2 ;;
        --tls-cert) TLS=given; TLS_CERT=$(realpath "${2:?--tls-cert needs a file}"); shift 2 ;;
        --tls-key) TLS_KEY=$(realpath "${2:?--tls-key needs a file}"); shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done

[ "$TLS" != given ] || [ -n "$TLS_KEY" ] || die "--tls-cert needs --tls-key too"
[ -z "$TLS_KEY" ] || [ "$TLS" = given ] || die "--tls-key needs --tls-cert too"

OPT=$PREFIX/opt/hearth
ETC=$PREFIX/etc/hearth
STATE=$PREFIX/var/lib/hearth
UNIT=$PREFIX/etc/systemd/system/hearth.service
AS_SERVICE_USER=""
[ "$(id -u)" = 0 ] && [ -z "$PREFIX" ] && AS_SERVICE_USER="sudo -u $SERVICE_USER "

# 1. Nothing altered on the way: every file of wheels/ and models/ is listed in manifest.json and
#    matches its sha256. (manifest.json itself is checked by comparing its sha256, printed here,
#    with the one `hearth bundle` printed on the connected machine.)
verify_bundle() {
    command -v sha256sum >/dev/null || die "sha256sum is missing: install coreutils"
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install python3 and python3-venv"
    [ -f "$BUNDLE/manifest.json" ] || die "no manifest.json beside install.sh: unpack the whole bundle"
    say "manifest.json sha256 $(sha256sum "$BUNDLE/manifest.json" | cut -d' ' -f1)"
    local sums
    sums=$(mktemp)
    BUNDLE_PYTHON=$("$PYTHON" - "$BUNDLE" "$sums" <<'PY'
import json, os, sys
bundle, sums = sys.argv[1], sys.argv[2]
manifest = json.load(open(os.path.join(bundle, "manifest.json")))
with open(sums, "w") as f:
    for rel, entry in sorted(manifest["files"].items()):
        f.write(f"{entry['sha256']}  {rel}\n")
unlisted = []
for top in ("wheels", "models"):
    for root, _, names in os.walk(os.path.join(bundle, top)):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), bundle)
            if rel not in manifest["files"]:
                unlisted.append(rel)
if unlisted:
    sys.exit("install.sh: refusing to install: not in manifest.json (added after the bundle was "
             "built): " + ", ".join(sorted(unlisted)))
print(manifest["python_version"])
PY
    ) || { rm -f "$sums"; exit 1; }
    local report
    if ! report=$(cd "$BUNDLE" && sha256sum --check --quiet "$sums" 2>/dev/null); then
        rm -f "$sums"
        local bad
        bad=$(printf '%s\n' "$report" | sed -n 's/: FAILED.*$//p' | paste -sd ' ' -)
        die "refusing to install: ${bad:-some files} do(es) not match manifest.json (altered or damaged on the way); get a fresh copy of the bundle"
    fi
    rm -f "$sums"
    say "all files match manifest.json (Python $BUNDLE_PYTHON bundle)"
}

# 2. The venv, from the bundled wheels only. Reused (upgraded) when its Python matches.
install_venv() {
    local have venv_python
    have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$have" = "$BUNDLE_PYTHON" ] || die "the bundle's wheels are for Python $BUNDLE_PYTHON, but $PYTHON is $have: pass --python python$BUNDLE_PYTHON (or build the bundle with --python-version $have)"
    venv_python=$OPT/venv/bin/python
    if [ -x "$venv_python" ] && [ "$("$venv_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$have" ]; then
        say "upgrading $OPT/venv"
    else
        say "creating $OPT/venv"
        rm -rf "$OPT/venv"
        mkdir -p "$OPT"
        "$PYTHON" -m venv "$OPT/venv" || die "cannot create a venv: install python3-venv"
    fi
    # --isolated: ignore pip configuration and PIP_* variables (an index URL would mean network).
    local pip=("$venv_python" -m pip --isolated --disable-pip-version-check --no-input -q)
    say "installing wheels (pip --no-index, the versions of requirements.lock)"
    "${pip[@]}" install --no-index --find-links "$BUNDLE/wheels" --upgrade \
        -c "$BUNDLE/requirements.lock" -r "$BUNDLE/requirements.txt"
    # The same version number may carry new code: always reinstall Hearth itself.
    "${pip[@]}" install --no-index --no-deps --force-reinstall "$BUNDLE"/wheels/hearth-*.whl
    mkdir -p "$OPT/bin"
    # bin/hearth: the hearth command with the settings of hearth.env (as the unit has them); a
    # variable already in the environment (docker run -e, a Kubernetes env) wins over the file,
    # and flags win over both. bin/hearth-serve: what the unit runs, for starting by hand.
    cat >"$OPT/bin/hearth" <<EOF
#!/bin/sh
while IFS= read -r line; do
    case "\$line" in '' | '#'*) continue ;; esac
    printenv "\${line%%=*}" >/dev/null || export "\$line"
done <"$ETC/hearth.env"
exec "$OPT/venv/bin/hearth" "\$@"
EOF
    printf '#!/bin/sh\nexec "%s" serve "$@"\n' "$OPT/bin/hearth" >"$OPT/bin/hearth-serve"
    chmod 755 "$OPT/bin/hearth" "$OPT/bin/hearth-serve"
}

# 3. Models: files under the state directory, entries merged into its catalogue (other models and
#    the default model kept), then every checksum verified where the server will read them.
install_models() {
    mkdir -p "$STATE/models"
    local dir name
    for dir in "$BUNDLE"/models/*/; do
        [ -d "$dir" ] || continue
        name=$(basename "$dir")
        say "installing model $name"
        rm -rf "$STATE/models/$name.new"
        cp -R "$dir" "$STATE/models/$name.new"
        rm -rf "$STATE/models/$name"
        mv "$STATE/models/$name.new" "$STATE/models/$name"
    done
    cp "$BUNDLE/models/models.toml" "$STATE/models/bundle-models.toml"
    local hearth=("$OPT/venv/bin/hearth" models --catalog "$STATE/models.toml")
    "${hearth[@]}" import --replace "$STATE/models/bundle-models.toml"
    "${hearth[@]}" verify || die "a model file does not match its sha256 (see above)"
}

# 4. Configuration, written once: an upgrade keeps the operator's edits.
write_config() {
    mkdir -p "$ETC"
    if [ -f "$ETC/hearth.env" ]; then
        say "keeping $ETC/hearth.env"
        return
    fi
    local no_ui=1
    grep -q '"ui": true' "$BUNDLE/manifest.json" && no_ui=0
    cat >"$ETC/hearth.env" <<EOF
# Hearth settings for the hearth service (systemd EnvironmentFile). Upgrades keep this file.
# Every \`hearth serve --help\` option has a HEARTH_* variable. After editing:
#   systemctl restart hearth
HEARTH_HOST=$HOST
HEARTH_PORT=$PORT
HEARTH_MODELS_TOML=$STATE/models.toml
HEARTH_NO_UI=$no_ui
# The audit log (one JSON line per API call, no prompt text): $STATE/audit/audit.jsonl
HEARTH_STATE_DIR=$STATE
# HEARTH_MODEL=smollm2-135m-instruct
# HEARTH_API_KEY=change-me
# Named keys with quotas (the file exists, empty): hearth keys --file $ETC/keys.toml add NAME;
# then set HEARTH_API_KEYS_FILE=$ETC/keys.toml   (systemctl reload hearth re-reads it)
# HEARTH_DEVICE=auto
# Caches (compiled kernels) go to the writable state directory.
HOME=$STATE
XDG_CACHE_HOME=$STATE/cache
TRITON_CACHE_DIR=$STATE/cache/triton
HF_HUB_OFFLINE=1
EOF
    chmod 640 "$ETC/hearth.env"
    say "wrote $ETC/hearth.env"
}

# 4a. An empty API keys file, made once: `hearth keys` keeps its owner, group and mode when it
#     rewrites it, so keys added by root stay readable by the service (root:hearth, 0640 below).
write_keys_file() {
    [ -f "$ETC/keys.toml" ] && return
    printf '# Hearth API keys: hearth keys --file %s add NAME (see docs/operations.md)\n' \
        "$ETC/keys.toml" >"$ETC/keys.toml"
    chmod 640 "$ETC/keys.toml"
}

# 4b. TLS: a self-signed certificate made here, or the operator's pair, in $ETC/tls; hearth.env
#     gets the two HEARTH_SSL_* lines (also on an upgrade that asks for TLS).
setup_tls() {
    [ "$TLS" != no ] || return 0
    mkdir -p "$ETC/tls"
    if [ "$TLS" = given ]; then
        install -m 644 "$TLS_CERT" "$ETC/tls/cert.pem"
        install -m 600 "$TLS_KEY" "$ETC/tls/key.pem"
    else
        local names=()
        for name in "${TLS_NAMES[@]}"; do names+=(--name "$name"); done
        "$OPT/venv/bin/hearth" cert --out-dir "$ETC/tls" --force "${names[@]}"
    fi
    local env_file=$ETC/hearth.env
    sed -i -e '/^HEARTH_SSL_CERTFILE=/d' -e '/^HEARTH_SSL_KEYFILE=/d' "$env_file"
    printf 'HEARTH_SSL_CERTFILE=%s\nHEARTH_SSL_KEYFILE=%s\n' "$ETC/tls/cert.pem" \
        "$ETC/tls/key.pem" >>"$env_file"
    say "TLS: $ETC/tls/cert.pem (clients trust this file, or compare its fingerprint)"
}

# 5. The unit, with this install's paths; started where systemd runs (not under --prefix).
install_unit() {
    mkdir -p "$(dirname "$UNIT")"
    sed -e "s|/opt/hearth|$OPT|g" -e "s|/etc/hearth|$ETC|g" -e "s|/var/lib/hearth|$STATE|g" \
        -e "s|^User=.*|User=$SERVICE_USER|" -e "s|^Group=.*|Group=$SERVICE_USER|" \
        "$BUNDLE/hearth.service" >"$UNIT.tmp"
    mv "$UNIT.tmp" "$UNIT"
    if [ "$(id -u)" = 0 ] && [ -z "$PREFIX" ]; then
        if ! id "$SERVICE_USER" >/dev/null 2>&1; then
            useradd --system --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin \
                "$SERVICE_USER"
            say "created system user $SERVICE_USER"
        fi
        chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE"
        chown "root:$SERVICE_USER" "$ETC/hearth.env" "$ETC/keys.toml"
        if [ -d "$ETC/tls" ]; then
            chown -R "root:$SERVICE_USER" "$ETC/tls"
            chmod 640 "$ETC/tls/key.pem"
        fi
    fi
}

start_service() {
    local host port url cert scheme
    host=$(set -a; . "$ETC/hearth.env"; echo "${HEARTH_HOST:-127.0.0.1}")
    port=$(set -a; . "$ETC/hearth.env"; echo "${HEARTH_PORT:-8000}")
    cert=$(set -a; . "$ETC/hearth.env"; echo "${HEARTH_SSL_CERTFILE:-}")
    scheme=http
    [ -z "$cert" ] || scheme=https
    case "$host" in 0.0.0.0 | ::) url="$scheme://127.0.0.1:$port/" ;; *) url="$scheme://$host:$port/" ;; esac
    if [ "$SYSTEMD" = no ] || [ -n "$PREFIX" ] || [ ! -d /run/systemd/system ] || ! command -v systemctl >/dev/null; then
        say "systemd is not running here (a container?) or was not asked for: the unit is in $UNIT but not started."
        say "Start Hearth by hand with:"
        printf '    %s%s\n' "$AS_SERVICE_USER" "$OPT/bin/hearth-serve"
        say "then it answers at $url (OpenAI API: ${url}v1)"
        return
    fi
    systemctl daemon-reload
    systemctl enable --quiet hearth.service
    systemctl restart hearth.service
    say "waiting for ${url}health (up to $WAIT s)"
    if ! "$OPT/venv/bin/python" - "${url}health" "$WAIT" "$cert" <<'PY'
import ssl, sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
context = ssl.create_default_context(cafile=sys.argv[3]) if sys.argv[3] else None
if context is not None:
    context.check_hostname = False  # the certificate names this host; the URL may say 127.0.0.1
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(2)
sys.exit(1)
PY
    then
        die "Hearth did not become healthy: see journalctl -u hearth -n 50"
    fi
    say "Hearth is running: $url (OpenAI API: ${url}v1)"
}

verify_bundle
install_venv
install_models
write_config
write_keys_file
setup_tls
install_unit
start_service
